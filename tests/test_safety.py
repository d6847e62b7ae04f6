"""Never wrong in silence (issue 14): every damaged input the audit found gives one line
``error: ...`` and exit status 2 (or a correct result), never a traceback and never a half-made
output folder. Cases: damaged MNIST files through the CLI (gzip bomb, swapped files, --no-verify),
damaged run folders (config.json fields, weights, history, predictions), damaged LoRA adapters,
an --out that is a file, and a one-cycle schedule of 4 steps."""

from __future__ import annotations

import gzip
import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from digitlens.cli import app
from digitlens.errors import DigitlensError


@pytest.fixture(autouse=True)
def quiet_env(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("DIGITLENS_FIGURE_WORKERS", "0")
    monkeypatch.setenv("DIGITLENS_CACHE", str(tmp_path_factory.mktemp("cache")))


def cli(*args) -> tuple[int, str]:
    """(exit code, stderr + stdout) of ``digitlens ARGS``; a traceback fails the test."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"traceback instead of one line: {result.exception!r}")
    return result.exit_code, result.output


def one_error_line(code: int, output: str) -> str:
    """The single ``error: ...`` line of a refused command (exit status 2)."""
    assert code == 2, output
    lines = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, output
    return lines[0]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A trained and evaluated 1-epoch CNN run on the bundled digits (a few seconds)."""
    import os

    os.environ["DIGITLENS_FIGURE_WORKERS"] = "0"
    run = tmp_path_factory.mktemp("runs") / "cnn"
    assert cli("train", "--out", run, "--epochs", 1, "--no-progress")[0] == 0
    assert cli("evaluate", run, "--no-progress", "--bootstrap", 0)[0] == 0
    return run


def copy_run(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(run, target)
    return target


# --- MNIST files through the CLI ----------------------------------------------------------

def _idx(array: np.ndarray) -> bytes:
    return struct.pack(f">I{array.ndim}I", {1: 2049, 3: 2051}[array.ndim], *array.shape) + array.astype(np.uint8).tobytes()


def _fake_mnist(folder: Path, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for prefix, n in (("train", 60), ("t10k", 20)):
        (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(rng.integers(0, 256, (n, 28, 28)))))
        (folder / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx(np.arange(n) % 10)))


@pytest.mark.slow
def test_swapped_mnist_files_are_refused_and_no_verify_trains_on_them(tmp_path):
    _fake_mnist(tmp_path / "variant")
    args = ("train", "--dataset", "mnist", "--data-dir", tmp_path / "variant", "--epochs", 1, "--val-fraction", 0.25,
            "--no-progress")
    line = one_error_line(*cli(*args, "--out", tmp_path / "refused"))
    assert "not the canonical MNIST file" in line and "--no-verify" in line
    assert not (tmp_path / "refused").exists()
    code, output = cli(*args, "--out", tmp_path / "variant-run", "--no-verify")
    assert code == 0, output
    assert json.loads((tmp_path / "variant-run" / "config.json").read_text())["verify"] is False
    # later stages read the variant too: the run remembers it was trained on one
    assert cli("evaluate", tmp_path / "variant-run", "--no-progress", "--bootstrap", 0)[0] == 0


@pytest.mark.slow
def test_gzip_bomb_through_train_is_one_line(tmp_path):
    _fake_mnist(tmp_path / "bomb")
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    body = _idx(np.zeros((60, 28, 28)))
    blob = comp.compress(body) + b"".join(comp.compress(bytes(1 << 20)) for _ in range(32)) + comp.flush()
    (tmp_path / "bomb" / "train-images-idx3-ubyte.gz").write_bytes(blob)
    line = one_error_line(*cli("train", "--dataset", "mnist", "--data-dir", tmp_path / "bomb", "--out",
                               tmp_path / "run", "--no-progress", "--no-verify"))
    assert "train-images-idx3-ubyte.gz: more data after the 47040 bytes the IDX header promises" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_images_that_are_not_28x28_leave_no_run_folder(tmp_path):
    _fake_mnist(tmp_path / "small")
    (tmp_path / "small" / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(np.zeros((60, 14, 14)))))
    line = one_error_line(*cli("train", "--dataset", "mnist", "--data-dir", tmp_path / "small", "--out",
                               tmp_path / "run", "--no-progress", "--no-verify"))
    assert "images of 14x14 pixels, expected 28x28" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_all_zero_labels_are_refused_even_with_no_verify(tmp_path):
    _fake_mnist(tmp_path / "zeros")
    (tmp_path / "zeros" / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx(np.zeros(60))))
    line = one_error_line(*cli("train", "--dataset", "mnist", "--data-dir", tmp_path / "zeros", "--out",
                               tmp_path / "run", "--no-progress", "--no-verify", "--val-fraction", 0))
    assert line == "error: --dataset mnist: the training split holds only digit 0; nothing to tell apart"
    assert not (tmp_path / "run").exists()


# --- training ------------------------------------------------------------------------------

@pytest.mark.slow
def test_one_cycle_schedule_of_four_steps_trains(tmp_path):
    """`train --dataset digits --epochs 1 --batch-size 303`: 1,212 training images make 4 steps and
    pct_start 0.25 puts the warm-up's end on step 0, where OneCycleLR divided by zero."""
    from dataclasses import replace

    from digitlens.train import DEFAULT_HYPER, make_optimizer

    code, output = cli("train", "--out", tmp_path / "run", "--epochs", 1, "--batch-size", 303, "--no-progress")
    assert code == 0, output
    hyper = replace(DEFAULT_HYPER["cnn"], lr=0.1)
    net = torch.nn.Linear(2, 2)
    optimizer, scheduler = make_optimizer(net, hyper, 4)
    rates = []
    for _ in range(4):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # Oracle: a warm-up a hair longer than one step (pct_start x 4 = 1.0001) gives the same rates.
    ref_net = torch.nn.Linear(2, 2)
    ref_opt = torch.optim.SGD(ref_net.parameters(), lr=0.1)
    ref = torch.optim.lr_scheduler.OneCycleLR(ref_opt, max_lr=0.1, total_steps=4, pct_start=0.25 * 1.0001)
    expected = []
    for _ in range(4):
        expected.append(ref_opt.param_groups[0]["lr"])
        ref_opt.step()
        ref.step()
    np.testing.assert_allclose(rates, expected, rtol=1e-3)


@pytest.mark.slow
def test_out_that_is_a_file(tmp_path, digits_run):
    (tmp_path / "afile").write_text("x")
    line = one_error_line(*cli("train", "--out", tmp_path / "afile", "--epochs", 1, "--no-progress"))
    assert line == f"error: --out {tmp_path / 'afile'}: is a file, not a folder; choose a new --out folder"
    line = one_error_line(*cli("evaluate", digits_run, "--dataset", "digits", "--out", tmp_path / "afile",
                               "--no-progress", "--bootstrap", 0))
    assert str(tmp_path / "afile") in line


# --- damaged run folders ---------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("field, value, needle", [
    ("n_classes", "ten", "n_classes 'ten' is not a whole number"),
    ("n_classes", 2 ** 40, "n_classes 1099511627776 is not a whole number"),
    ("model_kwargs", [1, 2], "model_kwargs is a list, expected an object"),
    ("model_kwargs", {"widths": [16, 32, 2 ** 40]}, "out of range"),
    ("model_kwargs", {"colour": 3}, "do not build model 'cnn'"),
])
def test_config_fields_of_the_wrong_type_or_size(tmp_path, digits_run, field, value, needle):
    run = copy_run(digits_run, tmp_path)
    config = json.loads((run / "config.json").read_text())
    config[field] = value
    (run / "config.json").write_text(json.dumps(config))
    line = one_error_line(*cli("evaluate", run, "--no-progress", "--bootstrap", 0))
    assert str(run / "config.json") in line and needle in line


@pytest.mark.slow
def test_damaged_weights(tmp_path, digits_run):
    from safetensors.torch import load_file, save_file

    run = copy_run(digits_run, tmp_path)
    weights = run / "model.safetensors"
    state = {k: v.clone() for k, v in load_file(str(weights)).items()}  # not the mmap of a file cut below
    weights.write_bytes(weights.read_bytes()[:3000])
    assert "not a readable safetensors file" in one_error_line(*cli("evaluate", run, "--no-progress", "--bootstrap", 0))
    key = next(k for k, v in state.items() if v.is_floating_point())
    save_file({**state, key: torch.full_like(state[key], float("nan"))}, str(weights))
    assert f"tensor {key!r} holds NaN" in one_error_line(*cli("evaluate", run, "--no-progress", "--bootstrap", 0))
    save_file({**state, key: state[key].to(torch.int8)}, str(weights))
    assert f"tensor {key!r} is int8" in one_error_line(*cli("evaluate", run, "--no-progress", "--bootstrap", 0))


@pytest.mark.slow
def test_report_over_damaged_files(tmp_path, digits_run):
    run = copy_run(digits_run, tmp_path)
    (run / "history.csv").write_bytes(b"\xff\xfeepoch,loss\n")
    assert one_error_line(*cli("report", run)) == f"error: {run / 'history.csv'}: not UTF-8 text (byte 0)"
    shutil.copy(digits_run / "history.csv", run / "history.csv")
    preds = dict(np.load(run / "predictions.npz"))
    np.savez(run / "predictions.npz", **{**preds, "y_pred": preds["y_pred"][:5]})
    assert "5 y_pred for 450 y_true" in one_error_line(*cli("report", run))
    (run / "predictions.npz").write_bytes(b"garbage")
    assert "not a .npz file" in one_error_line(*cli("report", run))
    assert not (run / "report.html").exists()


# --- damaged LoRA adapters -------------------------------------------------------------------

def _adapter(folder: Path, config, rng, *, rank: int = 4, nan: bool = False, extra=None) -> Path:
    from safetensors.numpy import save_file

    folder.mkdir(parents=True)
    a = rng.normal(size=(rank, 12)).astype(np.float32)
    b = rng.normal(size=(16, rank)).astype(np.float32)
    if nan:
        a[0, 0] = np.nan
    save_file({"base_model.model.blocks.0.q.lora_A.weight": a, "base_model.model.blocks.0.q.lora_B.weight": b,
               **(extra or {})}, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("case, needle", [
    ("plain", None),
    ("config list", "adapter_config.json: expected a JSON object, found list"),
    ("alpha abc", "adapter_config.json: lora_alpha 'abc' is not a finite number"),
    ("alpha_pattern regex", "alpha_pattern key '(' is not a regular expression"),
    ("alpha_pattern list", "alpha_pattern is a list, expected an object"),
    ("rank 0", "has rank 0"),
    ("nan weights", "holds NaN or infinite values"),
    ("int8 base", "is int8; only floating-point weights are analysed"),
    ("dora", "a DoRA adapter"),
])
def test_damaged_adapters_are_one_line_and_write_nothing(tmp_path, case, needle):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    weight = rng.normal(size=(16, 12)).astype(np.float32)
    base = tmp_path / "base.safetensors"
    save_file({"blocks.0.q.weight": (weight * 10).astype(np.int8) if case == "int8 base" else weight}, str(base))
    config = {"r": 4, "lora_alpha": 8}
    kwargs = {}
    if case == "config list":
        config = [1, 2]
    elif case == "alpha abc":
        config["lora_alpha"] = "abc"
    elif case == "alpha_pattern regex":
        config["alpha_pattern"] = {"(": 3}
    elif case == "alpha_pattern list":
        config["alpha_pattern"] = [1]
    elif case == "rank 0":
        config["r"], kwargs["rank"] = 0, 0
    elif case == "nan weights":
        kwargs["nan"] = True
    elif case == "dora":
        config["use_dora"] = True
        kwargs["extra"] = {"base_model.model.blocks.0.q.lora_magnitude_vector": np.ones(16, np.float32)}
    adapter = _adapter(tmp_path / "adapter", config, rng, **kwargs)
    out = tmp_path / "out"
    code, output = cli("subspace", "--base", base, "--adapter", adapter, "--out", out)
    if needle is None:
        assert code == 0, output
        assert (out / "subspace.json").is_file()
        return
    assert needle in one_error_line(code, output)
    assert not out.exists()


# --- one writer per run folder -----------------------------------------------------------------

def _hold_lock_in_subprocess(folder: Path, stage: str = "train"):
    """A Python process holding run_lock(folder) until killed; returns it once the lock is held."""
    import subprocess
    import sys

    code = ("import sys, time; from digitlens.runio import run_lock\n"
            f"with run_lock({str(folder)!r}, {stage!r}):\n    print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"held", proc.stderr.read().decode()
    return proc


@pytest.mark.slow
def test_second_writer_is_refused_naming_the_pid_and_a_dead_holder_is_not_in_the_way(tmp_path, digits_run):
    import os
    import signal

    from digitlens.runio import run_lock

    run = copy_run(digits_run, tmp_path)
    holder = _hold_lock_in_subprocess(run, "train")
    try:
        with pytest.raises(DigitlensError) as err:
            with run_lock(run, "evaluate"):
                pass
        assert str(err.value) == (f"{run}: another digitlens process (PID {holder.pid}, train) is writing this run "
                                  "folder; wait for it to finish, or use another folder")
        for args in (("evaluate", run, "--no-progress", "--bootstrap", 0), ("report", run),
                     ("explain", run, "--methods", "saliency", "--faithfulness-size", 0, "--no-progress"),
                     ("train", "--out", run, "--resume", "--no-progress")):
            assert f"(PID {holder.pid}, train)" in one_error_line(*cli(*args)), args
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        holder.stdout.close()
        holder.stderr.close()
    # The kernel dropped the dead holder's lock; its PID is still in the file, and is no obstacle.
    assert (run / ".digitlens.lock").read_text().startswith(str(holder.pid))
    code, output = cli("report", run)
    assert code == 0, output
    assert not (run / ".digitlens.lock").exists()  # a stage that ends removes its lock file


@pytest.mark.slow
def test_two_trainings_into_one_folder(tmp_path):
    """`train --seed 1 --epochs 6 --out R & train --seed 2 --epochs 3 --out R`: the second is refused
    in one line naming the first's PID, and R holds the first run only."""
    import subprocess
    import sys
    import time

    run = tmp_path / "R"
    first = subprocess.Popen([sys.executable, "-m", "digitlens", "train", "--seed", "1", "--epochs", "6", "--out",
                              str(run), "--no-progress", "--threads", "1"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not (run / "config.json").exists():
            assert first.poll() is None, first.stderr.read().decode()
            assert time.monotonic() < deadline, "the first training wrote no config.json in 60 s"
            time.sleep(0.01)
        code, output = cli("train", "--seed", 2, "--epochs", 3, "--model", "mlp", "--out", run, "--no-progress")
        if first.poll() is None or code == 2:  # refused while the first one ran
            assert f"another digitlens process (PID {first.pid}, train)" in one_error_line(code, output)
        assert first.wait(timeout=120) == 0, first.stderr.read().decode()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
        first.stderr.close()
    config = json.loads((run / "config.json").read_text())
    assert config["seed"] == 1 and config["model"] == "cnn" and config["epochs"] == 6
    assert cli("evaluate", run, "--no-progress", "--bootstrap", 0)[0] == 0


@pytest.mark.slow
def test_a_failed_first_write_leaves_no_folder(tmp_path):
    code, output = cli("train", "--out", tmp_path / "new", "--model", "resnet", "--no-progress")
    assert "unknown model" in one_error_line(code, output)
    assert not (tmp_path / "new").exists()


# --- whole-stage outputs ---------------------------------------------------------------------

@pytest.mark.slow
def test_explain_output_is_replaced_as_a_whole(tmp_path, digits_run):
    run = copy_run(digits_run, tmp_path)
    args = ("--group-by", "predicted", "--faithfulness-size", 0, "--no-progress")
    # What an earlier `explain --methods saliency` left (its maps, figure and manifest):
    (run / "explain" / "figures").mkdir(parents=True)
    np.savez(run / "explain" / "maps_saliency.npz", maps=np.zeros((10, 7, 7)))
    (run / "explain" / "figures" / "per_digit_saliency.png").write_bytes(b"png")
    (run / "explain" / "manifest.json").write_text(json.dumps({"methods": ["saliency"]}))
    assert cli("explain", run, "--methods", "input_x_gradient", *args)[0] == 0
    files = sorted(p.relative_to(run / "explain").as_posix() for p in (run / "explain").rglob("*"))
    assert not any("saliency" in f for f in files), files  # the first run's maps and figures are gone
    assert "maps_input_x_gradient.npz" in files and "figures/per_digit_input_x_gradient.png" in files
    manifest = json.loads((run / "explain" / "manifest.json").read_text())
    assert manifest["methods"] == ["input_x_gradient"] and list(manifest["files"]["maps"]) == ["input_x_gradient"]
    assert not [p for p in run.iterdir() if p.name.endswith((".tmp", ".old"))]


@pytest.mark.slow
def test_orphans_of_killed_writers_are_cleaned_and_a_cut_swap_is_undone(tmp_path, digits_run):
    run = copy_run(digits_run, tmp_path)
    (run / ".metrics.json.k3j4.tmp").write_text("half")
    (run / "figures" / ".confusion_matrix.png.x1y2.tmp").write_bytes(b"half")
    (run / ".explain.abcd.tmp").mkdir()
    (run / ".explain.abcd.tmp" / "maps_saliency.npz").write_bytes(b"half")
    (run / ".explain.efgh.old").mkdir()  # killed between the two renames of a swap: explain/ is missing
    (run / ".explain.efgh.old" / "manifest.json").write_text("{}")
    assert cli("report", run)[0] == 0
    leftovers = [p for p in run.rglob("*") if p.name.endswith((".tmp", ".old"))]
    assert leftovers == []
    assert (run / "explain" / "manifest.json").read_text() == "{}"  # the old output is back, whole


# --- file modes ------------------------------------------------------------------------------

@pytest.mark.slow
def test_weights_follow_the_umask_like_every_other_file(digits_run):
    import os

    umask = os.umask(0)
    os.umask(umask)
    expected = 0o666 & ~umask
    for name in ("model.safetensors", "config.json", "checkpoints/epoch_001.pt", "metrics.json"):
        assert (digits_run / name).stat().st_mode & 0o777 == expected, name


def test_adapter_files_follow_the_umask(tmp_path):
    import os

    from digitlens.adapt import _save_adapter_atomically

    class FakePeft:  # writes like PEFT/safetensors: files created 0600, in place
        def save_pretrained(self, folder):
            for name in ("adapter_config.json", "adapter_model.safetensors"):
                fd = os.open(os.path.join(folder, name), os.O_WRONLY | os.O_CREAT, 0o600)
                os.write(fd, b"{}")
                os.close(fd)

    umask = os.umask(0)
    os.umask(umask)
    target = tmp_path / "adapt" / "r4_s0"
    _save_adapter_atomically(FakePeft(), target)
    _save_adapter_atomically(FakePeft(), target)  # replaced as a whole
    assert sorted(p.name for p in target.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert all(p.stat().st_mode & 0o777 == 0o666 & ~umask for p in target.iterdir())
    assert sorted(p.name for p in target.parent.iterdir()) == ["r4_s0"]


# --- a self-contained report ---------------------------------------------------------------

@pytest.mark.slow
def test_report_inlines_only_the_runs_own_png_images(tmp_path, digits_run):
    import re

    run = copy_run(digits_run, tmp_path)
    (tmp_path / "outside.png").write_bytes((run / "figures" / "confusion_matrix.png").read_bytes())
    (run / "insights.md").write_text(
        "# Insights\n\n- remote ![tracker](https://example.com/pixel.png)\n"
        "- local ![matrix](figures/confusion_matrix.png)\n- outside ![other](../outside.png)\n"
        "- scheme-less ![cdn](//example.com/x.png)\n")
    assert cli("report", run)[0] == 0
    page = (run / "report.html").read_text()
    sources = re.findall(r'<img[^>]*src="([^"]*)"', page)
    assert sources and all(src.startswith("data:image/png;base64,") for src in sources), \
        [s[:60] for s in sources if not s.startswith("data:")]
    assert '<img src="data:image/png;base64,' in page and 'alt="matrix"' in page
    for left_out in ("https://example.com/pixel.png", "../outside.png", "//example.com/x.png"):
        assert f"[image {left_out} left out: the report embeds only the run's own PNG files]" in page
