"""Subspace analysis against independent oracles: the naive double loop, identical and orthogonal
subspaces, the random expectation, a constructed amplification factor, and PEFT adapters of a
model digitlens did not train."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from digitlens.subspace import adapters as subspace_adapters
from digitlens.subspace import measures as subspace_measures
from digitlens.subspace import run as subspace_run
from digitlens.errors import DigitlensError
from test_layers import LAYERS


def naive_phi(u_rows, v_rows):
    """The definition, one (i, j) at a time."""
    out = np.zeros((u_rows.shape[0], v_rows.shape[0]))
    for i in range(1, u_rows.shape[0] + 1):
        for j in range(1, v_rows.shape[0] + 1):
            out[i - 1, j - 1] = np.linalg.norm(u_rows[:i] @ v_rows[:j].T, "fro") ** 2 / min(i, j)
    return out


def test_phi_matches_naive_double_loop():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((7, 40)), rng.standard_normal((12, 40))
    expected = naive_phi(subspace_measures.right_singular_vectors(a), subspace_measures.right_singular_vectors(b))
    got = subspace_measures.phi(a, b)
    assert got.shape == (7, 12)
    np.testing.assert_allclose(got, expected, atol=1e-12, rtol=0)


def test_phi_identical_subspaces_is_one_and_orthogonal_is_zero():
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.standard_normal((30, 30)))
    basis = q.T  # orthonormal rows
    # Same 6-dimensional span, different basis: phi(6, 6) = 1, and nested prefixes give 1 too.
    mixed = np.linalg.qr(rng.standard_normal((6, 6)))[0] @ basis[:6]
    assert subspace_measures.phi(basis[:6], mixed)[5, 5] == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(subspace_measures.phi_matrix(basis[:8], basis[:8]), np.ones((8, 8)), atol=1e-12)
    np.testing.assert_allclose(subspace_measures.phi_matrix(basis[:5], basis[5:12]), 0.0, atol=1e-12)


def test_phi_random_subspaces_match_chance_level():
    rng = np.random.default_rng(2)
    d, draws = 48, 300
    total = np.zeros((6, 10))
    for _ in range(draws):
        total += subspace_measures.phi(rng.standard_normal((6, d)), rng.standard_normal((10, d)))
    mean = total / draws
    expected = subspace_measures.chance_phi((6, 10), d)
    # Standard error of each mean is below 0.01 here; a wrong normalisation (min vs max) is off by > 0.1.
    np.testing.assert_allclose(mean, expected, atol=0.03)
    assert np.nanmax(np.abs(subspace_measures.chance_corrected(mean, d))) < 0.05


def test_chance_corrected_maps_chance_to_zero_and_identity_to_one():
    d = 20
    expected = subspace_measures.chance_phi((4, 5), d)
    np.testing.assert_allclose(subspace_measures.chance_corrected(expected, d), 0.0, atol=1e-12)
    np.testing.assert_allclose(subspace_measures.chance_corrected(np.ones((4, 5)), d), 1.0, atol=1e-12)
    assert np.isnan(subspace_measures.chance_corrected(np.ones((2, 2)), 2)[1, 1])


def test_amplification_on_constructed_matrices():
    rng = np.random.default_rng(3)
    d = 16
    u = np.linalg.qr(rng.standard_normal((d, d)))[0]
    v = np.linalg.qr(rng.standard_normal((d, d)))[0]
    sigma = np.linspace(10.0, 0.5, d)
    w = u @ np.diag(sigma) @ v.T
    # dW = 3 * u_k v_k^T along W's direction k: U^T W V^T = sigma_k, amplification = 3 / sigma_k.
    k = 11
    delta = 3.0 * np.outer(u[:, k], v[:, k])
    result = subspace_measures.amplification(w, delta)
    assert result["rank"] == 1
    assert result["norm_dW"] == pytest.approx(3.0)
    assert result["proj_dW"] == pytest.approx(sigma[k])
    assert result["amplification"] == pytest.approx(3.0 / sigma[k])
    assert result["proj_W"] == pytest.approx(sigma[0])  # W's own top direction
    assert result["norm_W"] == pytest.approx(np.sqrt((sigma ** 2).sum()))
    # Random unit directions: E[(u^T W v)^2] = ||W||_F^2 / d^2, so far below the top singular value.
    assert result["proj_random"] < sigma[0] / 2


def test_effective_rank_and_intruders():
    assert subspace_measures.effective_rank([2.0, 2.0, 2.0, 0.0]) == pytest.approx(3.0)
    assert subspace_measures.effective_rank([5.0]) == pytest.approx(1.0)
    rng = np.random.default_rng(4)
    d = 12
    u = np.linalg.qr(rng.standard_normal((d, d)))[0]
    w = u @ np.diag(np.linspace(5, 1, d)) @ u.T
    same = subspace_measures.intruder_dimensions(w, w * 1.01, top_k=5)
    assert same["count"] == 0
    # A strong update along (u0 + u1) / sqrt(2) turns the (u0, u1) plane by ~45 degrees: the top two
    # singular vectors of the result are intruders (|cos| ~ 0.707 < 0.8), the third is still u2.
    new = (u[:, 0] + u[:, 1]) / np.sqrt(2)
    shifted = subspace_measures.intruder_dimensions(w, w + 50 * np.outer(new, new), top_k=3, threshold=0.8)
    assert shifted["count"] == 2
    np.testing.assert_allclose(shifted["max_abs_cosine"], [np.sqrt(0.5), np.sqrt(0.5), 1.0], atol=0.01)


class TinyMLP(torch.nn.Module):
    """A model digitlens did not train, with other module names than the ViT."""

    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.ModuleDict({"fc_in": torch.nn.Linear(24, 32), "fc_out": torch.nn.Linear(32, 24)})
        self.classifier = torch.nn.Linear(24, 3)

    def forward(self, x):
        return self.classifier(torch.relu(self.encoder["fc_out"](torch.relu(self.encoder["fc_in"](x)))))


def _peft_adapter(tmp_path, rank: int, seed: int):
    """Base weights and a PEFT LoRA adapter (random nonzero B, as after training) on TinyMLP."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = TinyMLP()
    base_path = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(base_path))
    torch.manual_seed(seed)
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=4, target_modules=["fc_in", "fc_out"],
                                            init_lora_weights="gaussian"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    out = tmp_path / f"adapter_r{rank}_s{seed}"
    model.save_pretrained(str(out))
    return base_path, out, model


@pytest.mark.slow
def test_analyse_adapters_on_a_foreign_peft_model(tmp_path):
    base_path, adapter_a, peft_model = _peft_adapter(tmp_path, rank=4, seed=0)
    _, adapter_b, _ = _peft_adapter(tmp_path, rank=8, seed=1)
    summary = subspace_run.analyse_adapters(base_path, [adapter_a, adapter_b], tmp_path / "out", figures=False)
    names = [m["module"] for m in summary["modules"]]
    assert names == ["encoder.fc_in", "encoder.fc_out"]
    # The delta that was read back equals PEFT's own merged update.
    fc_in = peft_model.base_model.model.encoder["fc_in"]
    peft_delta = fc_in.get_delta_weight("default").detach().double().numpy()
    read = subspace_adapters.read_lora_adapter(adapter_a).modules["encoder.fc_in"]
    np.testing.assert_allclose(read.delta, peft_delta, rtol=0, atol=1e-6)  # float32 product in PEFT
    assert read.scale == pytest.approx(4 / 4)
    first = summary["modules"][0]["adapters"][0]
    assert first["rank"] == 4 and len(first["singular_values"]) == 4
    assert first["phi_W_A"]["chance_k_k"] == pytest.approx(4 / 24)
    assert summary["modules"][0]["phi_between"][0]["shape"] == [4, 8]
    saved = json.loads((tmp_path / "out" / "subspace.json").read_text())
    assert saved["labels"] == ["adapter_r4_s0", "adapter_r8_s1"]
    assert "| encoder.fc_out | adapter_r8_s1 | 8 |" in (tmp_path / "out" / "summary.md").read_text()


@pytest.mark.slow
def test_analyse_adapters_writes_figures_listed_in_its_manifest(tmp_path):
    from digitlens.figure_writer import read_figure_manifest

    base_path, adapter_a, _ = _peft_adapter(tmp_path, rank=4, seed=0)
    _, adapter_b, _ = _peft_adapter(tmp_path, rank=8, seed=1)
    out = tmp_path / "out"
    summary = subspace_run.analyse_adapters(base_path, [adapter_a, adapter_b], out, modules=["encoder.fc_in"])
    figures = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert figures == sorted(["phi_W_vs_A__fc_in.png", "phi_W_vs_A__fc_in_corrected.png", "phi_W_vs_A_seed003.png",
                              "phi_W_vs_A_seed003_corrected.png", "amplification.png", "dW_spectra.png"])
    manifest = json.loads((out / "figures.json").read_text())
    assert manifest["stage"] == "subspace"
    entries = {e["path"]: e for e in manifest["figures"]}
    # Paths relative to the folder, the same list in subspace.json; every file is there.
    assert sorted(entries) == sorted(f"figures/{name}" for name in figures) == sorted(summary["figures"])
    assert json.loads((out / "subspace.json").read_text())["figures"] == summary["figures"]
    assert len(read_figure_manifest(out)) == len(figures)
    assert {e["section"] for e in entries.values()} == {"lora"} and all(e["title"] for e in entries.values())
    seed003 = entries["figures/phi_W_vs_A_seed003_corrected.png"]
    assert (seed003["kind"], seed003["module"], seed003["ranks"], seed003["corrected"]) == (
        "subspace_paper_figure", "encoder.fc_in", [4, 8], True)
    assert seed003["adapters"] == ["adapter_r4_s0", "adapter_r8_s1"] and "task" not in seed003
    per_target = entries["figures/phi_W_vs_A__fc_in.png"]
    assert (per_target["kind"], per_target["modules"], per_target["corrected"]) == ("phi_w_vs_a", ["encoder.fc_in"], False)
    assert entries["figures/amplification.png"]["kind"] == "amplification"
    assert entries["figures/dW_spectra.png"]["kind"] == "spectrum"


def test_aggregates_in_subspace_json_are_the_means_of_its_module_entries(tmp_path):
    """The per-target, per-adapter and per-comparison numbers a report reads are plain means and
    counts of the per-module entries beside them."""
    base_path, adapter_a, _ = _peft_adapter(tmp_path, rank=4, seed=0)
    _, adapter_b, _ = _peft_adapter(tmp_path, rank=8, seed=1)
    summary = subspace_run.analyse_adapters(base_path, [adapter_a, adapter_b], tmp_path / "out", figures=False)
    modules = summary["modules"]
    by_target = {(e["target"], e["adapter"]): e for e in summary["phi_W_A_by_target"]}
    entry = by_target[("fc_in", "adapter_r8_s1")]
    phi_w_a = modules[0]["adapters"][1]["phi_W_A"]
    assert (entry["rank"], entry["n_modules"], entry["modules"]) == (8, 1, ["encoder.fc_in"])
    assert entry["phi_k_k_mean"] == phi_w_a["phi_k_k"] and entry["p_1_1_median"] == phi_w_a["p_1_1"]
    assert entry["above_chance_k_k"] == int(phi_w_a["above_chance_k_k"])
    assert by_target[("fc_out", "random")]["phi_1_1_mean"] == modules[1]["phi_W_random"]["phi_1_1"]
    agg = subspace_run.aggregate_phi([m["phi_between"][0] for m in modules])
    loop_sum, hits = 0.0, 0
    for m in modules:
        loop_sum += m["phi_between"][0]["phi_1_1"]
        hits += m["phi_between"][0]["above_chance_1_1"]
    assert agg["phi_1_1_mean"] == pytest.approx(loop_sum / 2) and agg["above_chance_1_1"] == hits
    first = summary["by_adapter"][0]
    assert first["effective_rank_mean"] == pytest.approx(np.mean([m["adapters"][0]["effective_rank"] for m in modules]))
    assert first["amplification_mean"] == pytest.approx(
        np.mean([m["adapters"][0]["amplification"]["amplification"] for m in modules]))
    assert set(summary) >= set(subspace_run.SUBSPACE_JSON_KEYS) - {"task", "seeds", "seed_for_ranks", "comparisons",
                                                               "full_finetuning_intruders", "amplification_by_rank"}


@pytest.mark.slow
def test_name_and_shape_mismatch_give_one_line_errors(tmp_path):
    base_path, adapter, _ = _peft_adapter(tmp_path, rank=2, seed=0)
    wrong_names = tmp_path / "other.safetensors"
    save_file({"layers.0.weight": torch.zeros(32, 24)}, str(wrong_names))
    with pytest.raises(DigitlensError, match=r"other.safetensors: no weight named 'encoder.fc_in.weight' for adapter module") as info:
        subspace_run.analyse_adapters(wrong_names, [adapter], tmp_path / "o1")
    assert "\n" not in str(info.value)
    wrong_shape = tmp_path / "shape.safetensors"
    save_file({"encoder.fc_in.weight": torch.zeros(32, 25), "encoder.fc_out.weight": torch.zeros(24, 32)},
              str(wrong_shape))
    with pytest.raises(DigitlensError, match=r"has shape \(32, 25\) but adapter module 'encoder.fc_in'"):
        subspace_run.analyse_adapters(wrong_shape, [adapter], tmp_path / "o2")
    with pytest.raises(DigitlensError, match="adapter_config.json: file not found"):
        subspace_run.analyse_adapters(base_path, [tmp_path], tmp_path / "o3")


@pytest.mark.slow
def test_gpt2_conv1d_adapter_with_fan_in_fan_out(tmp_path):
    """A tiny transformers GPT-2 built from a config (no download): its Conv1D weights are stored
    (in, out) and PEFT's adapter says fan_in_fan_out; dW must still match PEFT's own delta."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=20, n_positions=8,
                                       bos_token_id=0, eos_token_id=0))
    base_path = tmp_path / "gpt2.safetensors"
    save_file({k: v.clone().contiguous() for k, v in model.state_dict().items()
               if k != "lm_head.weight" and not k.endswith("attn.bias")}, str(base_path))
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True,
                                                  init_lora_weights="gaussian"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    summary = subspace_run.analyse_adapters(base_path, [tmp_path / "adapter"], tmp_path / "out", figures=False)
    assert [(m["module"], m["shape"]) for m in summary["modules"]] == [
        ("transformer.h.0.attn.c_attn", [48, 16]), ("transformer.h.1.attn.c_attn", [48, 16])]
    layer = peft_model.base_model.model.transformer.h[1].attn.c_attn
    peft_delta = layer.get_delta_weight("default").detach().double().numpy()  # (in, out) for Conv1D
    ours = subspace_adapters.read_lora_adapter(tmp_path / "adapter").modules["transformer.h.1.attn.c_attn"].delta
    np.testing.assert_allclose(ours, peft_delta.T, rtol=0, atol=1e-6)


def test_monte_carlo_null_of_phi_has_the_exact_expectation_and_is_seeded():
    d, shape = 24, (5, 8)
    null = subspace_measures.random_phi_null(d, shape, n_draws=4000, seed=7)
    assert null.shape == (4000, 5, 8)
    # E[phi(i, j)] = max(i, j) / d exactly; the standard error of each mean is below 0.003 here.
    np.testing.assert_allclose(null.mean(axis=0), subspace_measures.chance_phi(shape, d), atol=0.01)
    # Each draw is a phi of orthonormal directions: the naive loop on the same draw agrees.
    rng = np.random.default_rng(7)
    u = np.linalg.qr(rng.standard_normal((4000, d, 5)))[0][0].T
    v = np.linalg.qr(rng.standard_normal((4000, d, 8)))[0][0].T
    np.testing.assert_allclose(null[0], naive_phi(u, v), atol=1e-12)
    np.testing.assert_array_equal(subspace_measures.random_phi_null(d, shape, 50, seed=7), subspace_measures.random_phi_null(d, shape, 50, seed=7))
    assert not np.allclose(subspace_measures.random_phi_null(d, shape, 50, seed=8), subspace_measures.random_phi_null(d, shape, 50, seed=7))


def test_phi_significance_rejects_shared_directions_and_is_calibrated_on_random_ones():
    rng = np.random.default_rng(3)
    d, k = 20, 3
    basis = np.linalg.qr(rng.standard_normal((d, d)))[0].T
    same = subspace_measures.phi_summary(subspace_measures.phi_matrix(basis[:k], basis[:k]), d)
    assert same["above_chance_1_1"] and same["above_chance_k_k"]
    assert same["p_k_k"] == pytest.approx(1 / (subspace_measures.NULL_DRAWS + 1))  # nothing in the null reaches phi = 1
    # Independent random subspaces: about 5% read "above chance" (a one-sided test at 0.05).
    hits = [subspace_measures.phi_significance(subspace_measures.phi(rng.standard_normal((k, d)), rng.standard_normal((k, d))), d)
            ["above_chance_k_k"] for _ in range(400)]
    assert 0.02 <= np.mean(hits) <= 0.09
    # The p-value against a plain count.
    null = rng.standard_normal(99)
    assert subspace_measures.monte_carlo_p(0.5, null) == pytest.approx((1 + sum(x >= 0.5 for x in null)) / 100)


def test_projection_null_matches_its_exact_mean_square():
    """For random orthonormal U (m, r), V (n, r): E||U^T W V||_F^2 = (r / m)(r / n) ||W||_F^2."""
    rng = np.random.default_rng(4)
    w = rng.standard_normal((12, 9))
    null = subspace_measures.projection_null(w, 3, n_draws=4000, seed=1)
    expected = (3 / 12) * (3 / 9) * np.linalg.norm(w) ** 2
    assert np.mean(null ** 2) == pytest.approx(expected, rel=0.05)
    # amplification() tests ΔW's directions against it: W's own top directions are far above chance.
    u, s, vh = np.linalg.svd(w)
    amp = subspace_measures.amplification(w, u[:, :3] @ np.diag(s[:3]) @ vh[:3], rank=3)
    assert amp["above_chance"] and amp["p_proj_dW"] < 0.01


#: The floor of the package docstring's layer table (the one place it is written).
FLOOR = {f"digitlens.{name}" for name, layer in LAYERS.items() if layer == 0 and name}


def _digitlens_imports(path):
    """(module imported, at module level?) for every import of a digitlens module in ``path``."""
    import ast

    tree = ast.parse(path.read_text())
    top = set(map(id, tree.body))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("digitlens"):
            found += [(f"{node.module}.{a.name}" if node.module == "digitlens.plots" else node.module, id(node) in top)
                      for a in node.names]
        elif isinstance(node, ast.Import):
            found += [(a.name, id(node) in top) for a in node.names if a.name.startswith("digitlens")]
    return found


def test_subspace_layers_floor_figures_stage_without_local_imports():
    """measures and the figures import only the floor; nothing of digitlens is imported inside a
    function; the stage imports no stage of another kind (layer check with ast)."""
    from pathlib import Path

    src = Path(subspace_run.__file__).parent
    files = {"measures": src / "measures.py", "plots": src.parent / "plots" / "subspace.py",
             "adapters": src / "adapters.py", "run": src / "run.py", "init": src / "__init__.py"}
    imports = {name: _digitlens_imports(path) for name, path in files.items()}
    assert all(at_top for found in imports.values() for _, at_top in found), imports
    assert imports["init"] == []  # the package imports nothing: the floor loads without the stage
    assert {m for m, _ in imports["measures"]} <= FLOOR
    assert {m for m, _ in imports["plots"]} <= FLOOR | {"digitlens.plots._common"}
    assert {m for m, _ in imports["adapters"]} <= FLOOR
    allowed_run = FLOOR | {"digitlens.subspace.adapters", "digitlens.plots.subspace", "digitlens.plots._common"}
    assert {m for m, _ in imports["run"]} <= allowed_run, imports["run"]


@pytest.mark.parametrize("first", ["digitlens.plots.subspace", "digitlens.subspace.measures", "digitlens.subspace"])
def test_any_import_order_works(first):
    import subprocess
    import sys

    code = f"import {first}; from digitlens.subspace.run import analyse_run; from digitlens.plots.subspace import plot_spectra"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-1000:]


def _cli_options(command: str) -> set[str]:
    import typer

    from digitlens.cli import app

    click_command = typer.main.get_command(app).commands[command]
    return {opt for param in click_command.params for opt in (*param.opts, *param.secondary_opts)}


def test_every_flag_named_in_a_subspace_error_exists():
    """Errors name only flags the CLI has (``digitlens subspace``, or ``digitlens adapt`` where the
    error says to run it)."""
    import ast
    import re
    from pathlib import Path

    allowed = _cli_options("subspace") | _cli_options("adapt")
    named = set()
    for path in Path(subspace_run.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "DigitlensError":
                text = "".join(part.value for part in ast.walk(node.args[0])
                               if isinstance(part, ast.Constant) and isinstance(part.value, str))
                named |= set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", text))
    assert {"--module", "--adapter", "--base", "--out", "--task"} <= named
    assert named <= allowed, named - allowed


def test_subspace_command_needs_no_out(tmp_path):
    """Without --out the analysis goes to the adapter's subspace folder (and, for a run, to
    RUN/subspace/TASK: see test_adapt); with neither a run nor --base/--adapter, one line."""
    from typer.testing import CliRunner

    from digitlens.cli import app

    base_path, adapter, _ = _peft_adapter(tmp_path, rank=2, seed=0)
    result = CliRunner().invoke(app, ["subspace", "--base", str(base_path), "--adapter", str(adapter)])
    assert result.exit_code == 0, result.output
    assert json.loads((adapter / "subspace" / "subspace.json").read_text())["labels"] == [adapter.name]
    assert (adapter / "subspace" / "figures.json").is_file()
    result = CliRunner().invoke(app, ["subspace", "--base", str(base_path)])
    assert result.exit_code == 2 and result.output.startswith("error: subspace: give RUN_DIR")
    assert len(result.output.strip().splitlines()) == 1
