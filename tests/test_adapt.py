"""LoRA adaptation with PEFT on a tiny ViT run (digits), checked against PEFT itself, naive
per-digit counts and the subspace analysis of the adapters it wrote."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from digitlens.errors import DigitlensError
from digitlens.models import build_model, save_model
from digitlens.runio import read_npz, write_json

TINY_VIT = {"dim": 16, "depth": 1, "heads": 2, "mlp_dim": 32, "patch": 7}


def write_tiny_vit_run(run):
    """A run folder holding an untrained tiny ViT on digits (enough for the mechanics)."""
    torch.manual_seed(0)
    save_model(build_model("vit", n_classes=10, **TINY_VIT), run / "model.safetensors")
    write_json(run / "config.json", {"dataset": "digits", "model": "vit", "model_kwargs": TINY_VIT, "n_classes": 10,
                                     "seed": 0, "val_fraction": 0.1, "data_dir": None, "epochs": 1})


@pytest.fixture(scope="module")
def adapted_run(tmp_path_factory):
    """A tiny ViT 'run' on digits (untrained weights suffice for the mechanics) adapted to the
    groups task at ranks 2 and 4, two seeds, with both baselines."""
    from digitlens.adapt import adapt_run

    run = tmp_path_factory.mktemp("runs") / "tiny_vit"
    write_tiny_vit_run(run)
    results = adapt_run(run, task="groups", ranks=(2, 4), seeds=(0, 1), epochs=1, n_train=256, n_test=200,
                        progress=False)
    return run, results


@pytest.mark.slow
def test_adapt_writes_peft_adapters_and_a_table(adapted_run):
    run, results = adapted_run
    for rank in (2, 4):
        for seed in (0, 1):
            folder = run / "adapt" / "groups" / f"r{rank}_s{seed}"
            config = json.loads((folder / "adapter_config.json").read_text())
            assert config["r"] == rank and sorted(config["target_modules"]) == ["q", "v"]
            assert (folder / "adapter_model.safetensors").is_file()
    methods = [(r["method"], r["rank"]) for r in results["summary"]]
    assert methods == [("lora", 2), ("lora", 4), ("head_only", 0), ("full", 0)]
    by_method = {(r["method"], r["rank"]): r for r in results["summary"]}
    dim, head = TINY_VIT["dim"], TINY_VIT["dim"] * 2 + 2
    # LoRA on q and v of one block: 2 modules x r x (in + out), plus the new 2-class head.
    assert by_method[("lora", 4)]["trainable_params"] == 2 * 4 * (dim + dim) + head
    assert by_method[("head_only", 0)]["trainable_params"] == head
    assert by_method[("full", 0)]["trainable_params"] == results["total_params"]
    assert "| LoRA | 4 |" in (run / "adapt" / "groups" / "results.md").read_text()
    assert (run / "adapt" / "groups" / "figures" / "per_digit_groups_r2.png").is_file()


@pytest.mark.slow
def test_ranks_are_compared_by_mcnemar_on_the_saved_predictions(adapted_run):
    """results.json's rank_comparison: McNemar's exact test (scipy's binomtest on the discordant images,
    counted here by hand) of r = 2 against r = 4 in each seed; results.md quotes it and its intervals."""
    from scipy.stats import binomtest

    from digitlens.intervals import wilson_interval

    run, results = adapted_run
    saved = read_npz(run / "adapt" / "groups" / "predictions.npz")
    found = results["rank_comparison"]
    pair = found["pairs"][0]
    assert (pair["a"], pair["b"]) == (2, 4) and found["n_seeds"] == 2 and found["n_images"] == 200
    p_values = []
    for seed, counted in zip((0, 1), pair["per_seed"]):
        right2, right4 = saved[f"lora_r2_s{seed}"] == saved["y_true"], saved[f"lora_r4_s{seed}"] == saved["y_true"]
        b, c = int(np.sum(right2 & ~right4)), int(np.sum(~right2 & right4))
        assert (counted["b"], counted["c"]) == (b, c)
        p_values.append(1.0 if b + c == 0 else binomtest(min(b, c), b + c, 0.5).pvalue)
    assert pair["p"] == pytest.approx(max(p_values)) and pair["p_holm"] == pytest.approx(max(p_values))
    markdown = (run / "adapt" / "groups" / "results.md").read_text()
    assert f"Ranks compared: {found['sentence']}" in markdown
    best = found["best"]
    assert (("is the most accurate" in found["sentence"]) == (pair["p_holm"] < 0.05 and found["significant"])
            and f"r = {best}" in found["sentence"])
    row = next(r for r in results["summary"] if r["method"] == "lora" and r["rank"] == 4)
    low, high = wilson_interval(round(row["accuracy_mean"] * 200), 200)
    assert (f"| {row['accuracy_mean'] * 100:.2f}% ({low * 100:.2f}-{high * 100:.2f}) | {row['accuracy_std'] * 100:.2f} |"
            in markdown)


@pytest.mark.slow
def test_peft_round_trip_reproduces_the_saved_predictions(adapted_run):
    from peft import PeftModel

    from digitlens.adapt import _fresh_base, _task_data, load_adapted_model
    from digitlens.inference import predict

    run, results = adapted_run
    config = json.loads((run / "config.json").read_text())
    _, _, test_x, _, _, _ = _task_data(config, "groups", None, 256, 200)
    saved = read_npz(run / "adapt" / "groups" / "predictions.npz")
    model = load_adapted_model(run, run / "adapt" / "groups" / "r4_s1")
    assert isinstance(model, PeftModel)
    np.testing.assert_array_equal(predict(model, test_x)[0], saved["lora_r4_s1"])
    # Loaded by hand with PEFT: same logits; the adapter really changes the base's q/v outputs.
    by_hand = PeftModel.from_pretrained(_fresh_base(run, 2, seed=0), str(run / "adapt" / "groups" / "r4_s1")).eval()
    with torch.no_grad():
        torch.testing.assert_close(by_hand(test_x[:16]), model(test_x[:16]))
        with by_hand.disable_adapter():
            q_base = by_hand.base_model.model.blocks[0].attn.q(torch.ones(1, TINY_VIT["dim"]))
        q_adapted = by_hand.base_model.model.blocks[0].attn.q(torch.ones(1, TINY_VIT["dim"]))
    assert not torch.allclose(q_base, q_adapted)


def test_per_digit_group_metrics_match_counts():
    from digitlens.adapt import per_digit_group_metrics
    from digitlens.groups import GROUP_POSITIVE

    digits = np.array([1, 1, 1, 1, 0, 0, 3, 3, 2, 2])
    truth = np.isin(digits, GROUP_POSITIVE).astype(int)
    pred = np.array([1, 1, 1, 0, 1, 0, 0, 0, 1, 0])
    m = per_digit_group_metrics(digits, truth, pred)
    # Digit 1 (group 1): 3 of 4 put into group 1; predicted group 1 among {1s, 0s, 3s}: 3 ones + one 0.
    assert m["recall"][1] == pytest.approx(3 / 4) and m["precision"][1] == pytest.approx(3 / 4)
    # Digit 0 (group 0): 1 of 2 zeros kept in group 0; predicted 0 among {0s, 1s, 2s}: zero, 1, 2 -> 1/3.
    assert m["recall"][0] == pytest.approx(1 / 2) and m["precision"][0] == pytest.approx(1 / 3)
    assert m["support"][:4] == [2, 4, 2, 2]


@pytest.mark.slow
def test_subspace_of_the_run_matches_peft_merged_weights(adapted_run):
    from digitlens.adapt import load_adapted_model
    from digitlens.subspace.adapters import load_base_weights, read_lora_adapter
    from digitlens.subspace.run import analyse_run

    run, _ = adapted_run
    summary = analyse_run(run, task="groups", figures=False)
    assert [m["module"] for m in summary["modules"]] == ["blocks.0.attn.q", "blocks.0.attn.v"]
    assert [c["kind"] for c in summary["comparisons"]] == ["ranks", "seeds", "seeds"]
    assert (run / "subspace" / "groups" / "subspace.json").is_file()
    # dW read by digitlens.subspace equals PEFT's merged weight minus the base weight.
    merged = load_adapted_model(run, run / "adapt" / "groups" / "r2_s0").merge_and_unload()
    base = load_base_weights(run / "model.safetensors")
    delta = read_lora_adapter(run / "adapt" / "groups" / "r2_s0").modules["blocks.0.attn.v"].delta
    np.testing.assert_allclose(merged.blocks[0].attn.v.weight.detach().double().numpy() - base["blocks.0.attn.v.weight"],
                               delta, atol=1e-6)
    assert summary["full_finetuning_intruders"][0]["top_k"] == 10


@pytest.mark.slow
def test_bad_arguments_are_one_line_errors(adapted_run):
    from digitlens.adapt import adapt_run

    run, _ = adapted_run
    with pytest.raises(DigitlensError, match="--task 'colours'"):
        adapt_run(run, task="colours")
    with pytest.raises(DigitlensError, match="^--patience 0: must be at least 1$"):
        adapt_run(run, task="digits", patience=0, progress=False)
    with pytest.raises(DigitlensError, match="--targets q,qkv: .* no linear layer named 'qkv'"):
        adapt_run(run, task="digits", targets=("q", "qkv"), progress=False)
    with pytest.raises(DigitlensError, match="--ranks 64: larger than the model width 16"):
        adapt_run(run, task="digits", ranks=(64,), progress=False)


@pytest.mark.slow
def test_adapt_command_runs_the_whole_study_in_one_command(tmp_path):
    """`digitlens adapt` writes the adapters, the seed-002 per-digit figures and, without a second
    command, the subspace analysis with the seed-003 figure."""
    from typer.testing import CliRunner

    from digitlens.cli import app

    run = tmp_path / "tiny_vit"
    write_tiny_vit_run(run)
    result = CliRunner().invoke(app, ["adapt", str(run), "--ranks", "2,4", "--seeds", "0,1", "--epochs", "1",
                                      "--n-train", "128", "--n-test", "100", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert (run / "adapt" / "groups" / "r4_s1" / "adapter_model.safetensors").is_file()
    assert (run / "adapt" / "groups" / "figures" / "per_digit_groups_r2.png").is_file()
    summary = json.loads((run / "subspace" / "groups" / "subspace.json").read_text())
    assert summary
    assert (run / "subspace" / "groups" / "figures" / "phi_W_vs_A_seed003.png").is_file()


@pytest.mark.slow
def test_early_stopping_keeps_the_best_epochs_weights_as_a_hand_run_gets_them():
    """_train stops `patience` epochs after the validation accuracy last rose and puts back the
    best epoch's weights (highest validation accuracy, ties: lowest validation loss, read off the
    curve here): they equal those of a plain AdamW + OneCycleLR loop run for exactly the best
    epoch's number of epochs (same order of images), and score the best validation accuracy."""
    from torch import nn

    from digitlens.adapt import _train

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 6, generator=gen), torch.randint(0, 3, (48,), generator=gen)  # noise: it overfits
    val_x, val_y = torch.randn(40, 6, generator=gen), torch.randint(0, 3, (40,), generator=gen)

    def fresh():
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 3))

    kwargs = dict(epochs=25, lr=0.05, pct_start=0.2, batch_size=16, seed=3, weight_decay=0.0, progress=False, label="t")
    model = fresh()
    fitted = _train(model, x, y, val_x, val_y, patience=3, **kwargs)
    best, curve = fitted["best_epoch"], fitted["curve"]
    top = max(curve["val_accuracy"])
    rose = curve["val_accuracy"].index(top) + 1  # the first epoch at the top accuracy: it last rose there
    assert fitted["stopped_early"] and fitted["stop_reason"] == "patience"
    assert fitted["last_improvement_epoch"] == rose and fitted["epochs_run"] == rose + 3 < 25
    at_top = [e for e, a in zip(curve["epoch"], curve["val_accuracy"]) if a == top]
    assert best == min(at_top, key=lambda e: curve["val_loss"][e - 1])
    assert fitted["best_val_accuracy"] == top == curve["val_accuracy"][best - 1]
    def hand_run(n_epochs):
        """The same schedule (25 epochs long) in a plain loop, stopped after ``n_epochs``."""
        hand = fresh()
        opt = torch.optim.AdamW(hand.parameters(), lr=0.05, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=25 * 3, pct_start=0.2)
        order_gen = torch.Generator().manual_seed(3)
        for _ in range(n_epochs):
            hand.train()
            order = torch.randperm(48, generator=order_gen)
            for k in range(0, 48, 16):
                loss = nn.functional.cross_entropy(hand(x[order[k:k + 16]]), y[order[k:k + 16]])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        return hand

    hand = hand_run(best)
    for (name, p), (_, q) in zip(model.named_parameters(), hand.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)
    with torch.no_grad():
        assert (hand(val_x).argmax(1) == val_y).float().mean().item() == pytest.approx(fitted["best_val_accuracy"])
    # The last epoch's weights (what training without restoring would leave) are not the kept ones.
    assert not torch.allclose(next(hand_run(fitted["epochs_run"]).parameters()), next(model.parameters()))


def test_validation_split_is_fixed_and_disjoint():
    from digitlens.adapt import validation_split

    fit, val = validation_split(100, 0.2)
    assert len(val) == 20 and len(fit) == 80 and not set(fit) & set(val)
    assert sorted(np.concatenate([fit, val]).tolist()) == list(range(100))
    np.testing.assert_array_equal(validation_split(100, 0.2)[1], val)


def _rows(full, **lora):
    rows = [{"method": "full", "rank": 0, "seed": s, "accuracy": a} for s, a in enumerate(full)]
    for rank, accs in lora.items():
        rows += [{"method": "lora", "rank": int(rank[1:]), "seed": s, "accuracy": a} for s, a in enumerate(accs)]
    return rows


def test_verdict_names_the_smallest_rank_from_which_lora_matches_full_fine_tuning():
    from digitlens.adapt import lora_verdict

    full = [0.95, 0.96, 0.97]
    # r=4 tops out below full's worst seed; r=8 and r=64 reach into full's range.
    v = lora_verdict(_rows(full, r4=[0.90, 0.91, 0.93], r8=[0.93, 0.95, 0.94], r64=[0.96, 0.97, 0.98]), "digits")
    assert v["matched_from_rank"] == 8 and [e["matched"] for e in v["ranks"]] == [False, True, True]
    assert v["sentence"] == ("On task “digits”, LoRA matched full fine-tuning within the seeds' spread from r = 8: "
                             "r = 8 reaches 93.0-95.0% over 3 seeds against full fine-tuning's 95.0-97.0%.")
    v = lora_verdict(_rows(full, r4=[0.90, 0.91, 0.92], r64=[0.93, 0.94, 0.949]), "rotated")
    assert v["matched_from_rank"] is None
    assert v["sentence"].startswith("On task “rotated”, LoRA did not match full fine-tuning within the seeds' spread at "
                                    "any rank: its best, r = 64, reaches 93.0-94.9%")
    # A rank that matches while a larger one does not: no "from", both named.
    v = lora_verdict(_rows(full, r4=[0.95, 0.96, 0.96], r64=[0.90, 0.91, 0.92]), "groups")
    assert v["matched_from_rank"] is None and "at r = 4 but not at the larger r = 64 (90.0-92.0%)" in v["sentence"]
    assert lora_verdict(_rows([], r4=[0.9]), "groups")["sentence"] is None


def test_the_adapt_reading_states_the_verdict_and_the_convergence(tmp_path):
    from pathlib import Path

    from digitlens.adapt import _summarise, lora_verdict
    from digitlens.report.collect import RunData
    from digitlens.report.readings import reading

    rows = _rows([0.95, 0.96], r4=[0.96, 0.97])
    for k, row in enumerate(rows):
        row.update(trainable_params=10, trainable_fraction=0.1, train_seconds=1.0, epochs_run=8 + k, best_epoch=5,
                   best_val_accuracy=0.9, best_val_loss=0.3, stopped_early=k != 0)
    res = {"task": "digits", "rows": rows, "summary": _summarise(rows), "verdict": lora_verdict(rows, "digits"),
           "n_test": 400, "patience": 3, "epochs": 8}
    run = RunData(run_dir=Path(tmp_path), name="vit", config={}, adapt_results={"digits": res})
    lines = reading("adapt_accuracy", run, {"task": "digits"})  # what its figures.json entry shows
    assert res["verdict"]["sentence"] in lines and "from r = 4" in res["verdict"]["sentence"]
    curves = reading("adapt_training_curves", run, {"task": "digits"})
    assert curves[0].startswith("3 of 4 models stopped early (no better validation accuracy for 3 epochs) after 8-11")


def test_the_study_config_is_saved_beside_the_results_and_loads_back(adapted_run):
    """adapt/TASK/config.json holds the LoraStudyConfig the study ran with; load_study_config reads
    it back equal, and results.json carries the same fields."""
    from digitlens.adapt import LoraStudyConfig, load_study_config

    run, results = adapted_run
    folder = run / "adapt" / "groups"
    loaded = load_study_config(folder)
    expected = LoraStudyConfig(task="groups", ranks=(2, 4), seeds=(0, 1), epochs=1, n_train=256, n_test=200)
    assert loaded == expected and loaded.ranks == (2, 4)
    assert json.loads((folder / "config.json").read_text()) == results["config"] == expected.to_json()


def test_results_written_before_the_config_existed_still_load(tmp_path):
    """An older results.json (no config, n_train without the validation split, no schedules) gives
    its study's config: the images drawn are n_train + n_validation, the rest the defaults."""
    from digitlens.adapt import SCHEDULES, LoraStudyConfig, load_study_config

    folder = tmp_path / "adapt" / "digits"
    folder.mkdir(parents=True)
    rows = [{"method": "lora", "rank": 4, "seed": s, "accuracy": 0.9} for s in (0, 1)]
    write_json(folder / "results.json", {"task": "digits", "ranks": [4], "seeds": [0, 1], "targets": ["q", "v"],
                                         "epochs": 15, "patience": 3, "n_train": 970, "n_validation": 242,
                                         "n_test": 450, "lora_alpha": 8, "rows": rows})
    loaded = load_study_config(folder)
    assert loaded == LoraStudyConfig(task="digits", ranks=(4,), seeds=(0, 1), epochs=15, patience=3, n_train=1212,
                                     n_test=450, baselines=False)
    assert loaded.schedules == SCHEDULES
    write_json(folder / "results.json", {"task": "digits", "ranks": [4], "seeds": [0], "epochs": 0, "rows": rows})
    with pytest.raises(DigitlensError, match=r"results\.json: --epochs 0: must be at least 1$"):
        load_study_config(folder)


@pytest.mark.parametrize("field, value, message", [
    ("task", "colours", "--task 'colours': unknown task (choose from groups, digits, rotated)"),
    ("ranks", (4, 0), "--ranks 4,0: give positive integers"),
    ("ranks", (4, 4), "--ranks 4,4: a value repeats"),
    ("seeds", (), "--seeds : give at least one"),
    ("epochs", 2.5, "--epochs 2.5: expected a whole number"),
    ("patience", 0, "--patience 0: must be at least 1"),
    ("n_train", -1, "--n-train -1: must be at least 0"),
    ("val_fraction", 1.0, "val_fraction 1.0: must be between 0 and 1"),
    ("batch_size", "64", "batch_size '64': expected a whole number"),
    ("lora_alpha", 0, "lora_alpha 0.0: must be positive"),
    ("schedules", {"lora": {"lr": -1e-3}}, "schedules.lora.lr -0.001: must be positive"),
    ("schedules", {"adam": {"lr": 1e-3}}, "schedules 'adam': not a method with a schedule"),
])
def test_a_bad_study_config_is_a_one_line_error_naming_the_field(field, value, message):
    from digitlens.adapt import LoraStudyConfig

    with pytest.raises(DigitlensError) as caught:
        LoraStudyConfig(**{field: value})
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def test_a_partial_schedule_keeps_the_other_methods_defaults():
    from digitlens.adapt import SCHEDULES, LoraStudyConfig

    config = LoraStudyConfig(schedules={"lora": {"lr": 1e-2}})
    assert config.schedules["lora"] == {"lr": 1e-2, "pct_start": SCHEDULES["lora"]["pct_start"]}
    assert config.schedules["full"] == SCHEDULES["full"] and config.replace(epochs=None) == config
    with pytest.raises(TypeError, match="no field 'epoch'"):
        config.replace(epoch=3)


def test_the_figures_are_listed_in_the_adapt_manifest(adapted_run):
    """adapt/TASK/figures.json lists every figure with its kind, the lora section, the task and
    what it shows; results.json's figures are the same PNGs, relative to the run folder."""
    from digitlens.figure_writer import read_figure_manifest

    run, results = adapted_run
    folder = run / "adapt" / "groups"
    entries = read_figure_manifest(folder)
    by_kind = {}
    for entry in entries:
        by_kind.setdefault(entry["kind"], []).append(entry)
    assert sorted(by_kind) == ["adapt_accuracy", "adapt_per_digit", "adapt_training_curves"]
    assert all(e["section"] == "lora" and e["task"] == "groups" and e["title"] for e in entries)
    assert [e["rank"] for e in by_kind["adapt_per_digit"]] == [2, 4]
    assert by_kind["adapt_accuracy"][0]["ranks"] == [2, 4]
    assert by_kind["adapt_training_curves"][0]["methods"] == ["lora", "head_only", "full"]
    assert sorted(str(e["path"].relative_to(run)) for e in entries) == sorted(results["figures"])
    for entry in entries:
        assert entry["path"].with_suffix(".svg").is_file()


def test_per_digit_entries_name_their_adapter_and_accuracies_carry_their_interval(adapted_run):
    """Each per_digit entry of results.json says which adapter it is (method, rank, seed: the report
    reads these fields, never the key), its numbers are those of that adapter's saved predictions, and
    each summary row's accuracy_mean carries the Wilson interval of the n_test images (scipy)."""
    from scipy.stats import binomtest

    from digitlens.adapt import per_digit_group_metrics

    run, results = adapted_run
    saved = read_npz(run / "adapt" / "groups" / "predictions.npz")
    entries = results["per_digit"]
    assert sorted((e["method"], e["rank"], e["seed"]) for e in entries.values()) == [("lora", 2, 0), ("lora", 4, 0)]
    for e in entries.values():
        again = per_digit_group_metrics(saved["digits"], saved["y_true"], saved[f"lora_r{e['rank']}_s{e['seed']}"])
        assert {k: v for k, v in e.items() if k not in ("method", "rank", "seed")} == again
    for row in results["summary"]:
        n = results["n_test"]
        ci = binomtest(round(row["accuracy_mean"] * n), n).proportion_ci(confidence_level=0.95, method="wilson")
        assert row["accuracy_mean_ci"] == pytest.approx([ci.low, ci.high])


def test_convergence_counts_the_models_that_stopped_early(adapted_run):
    """results.json's convergence equals a count over the rows made here, and every row says why it stopped."""
    _, results = adapted_run
    rows = results["rows"]
    capped = [r for r in rows if r["stop_reason"] != "patience"]
    found = results["convergence"]
    assert found["n_models"] == len(rows) == 8 and found["stopped_early"] == len(rows) - len(capped)
    assert len(found["hit_cap"]) == len(capped) and found["all_stopped_early"] == (not capped)
    assert all(r["stopped_early"] == (r["stop_reason"] == "patience") for r in rows)
    assert found["sentence"] in results["markdown"]


def test_adapt_imports_digitlens_modules_only_at_its_top():
    """No function-local import of a digitlens module in adapt.py (issue 12's rule), read with ast."""
    import ast
    from pathlib import Path

    import digitlens.adapt

    tree = ast.parse(Path(digitlens.adapt.__file__).read_text())
    local = []
    for func in ast.walk(tree):
        if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(func):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("digitlens"):
                    local.append((func.name, node.module))
                if isinstance(node, ast.Import) and any(a.name.startswith("digitlens") for a in node.names):
                    local.append((func.name, node.names[0].name))
    assert local == []


def test_the_demos_adapt_settings_are_valid_study_configs():
    from digitlens.adapt import LoraStudyConfig
    from digitlens.demo import FAST, SETTINGS

    for settings in [FAST, *SETTINGS.values()]:
        for kwargs in settings["adapt"]:
            assert LoraStudyConfig(**kwargs).task == kwargs["task"]


def test_a_study_leaves_the_callers_random_state_and_repeats_itself(tmp_path):
    """Each model is seeded by its own seed inside adapt_run, whose global RNG state is put back:
    the caller's next random draw is the one it would have been, and a second run predicts the same."""
    from digitlens.adapt import adapt_run

    run = tmp_path / "tiny_vit"
    write_tiny_vit_run(run)
    kwargs = dict(task="rotated", ranks=(2,), seeds=(0,), epochs=2, n_train=64, n_test=50, baselines=False,
                  progress=False)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = adapt_run(run, **kwargs)
    torch.testing.assert_close(torch.rand(3), expected)
    torch.manual_seed(7)  # another caller state: the study's own results do not depend on it
    second = adapt_run(run, **kwargs)
    assert [r["curve"]["val_loss"] for r in first["rows"]] == [r["curve"]["val_loss"] for r in second["rows"]]
