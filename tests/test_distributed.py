"""--device and torchrun: device names, 2-process gloo training and explanation on 127.0.0.1, resume
after a killed multi-process run. Every torchrun job runs under a timeout, so a hung rendezvous
fails the test instead of the CI job."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from digitlens.device import check_precision, resolve_device
from digitlens.distributed import strip_nproc
from digitlens.errors import DigitlensError

#: Seconds any torchrun job of these tests may take before it is killed and the test fails.
JOB_TIMEOUT = 240
TINY_VIT = ["--model", "vit", "--width", "16", "--batch-size", "64", "--seed", "5"]


def _env():
    env = dict(os.environ, MPLBACKEND="Agg", DIGITLENS_DIST_TIMEOUT="120", DIGITLENS_DEVICE="cpu",
               DIGITLENS_FIGURE_WORKERS="0", MASTER_ADDR="127.0.0.1")
    return env


def _digitlens(*args, timeout=JOB_TIMEOUT):
    """Run ``python -m digitlens ARGS``; fail the test with its stderr when it fails or hangs."""
    try:
        done = subprocess.run([sys.executable, "-m", "digitlens", *args], capture_output=True, text=True,
                              timeout=timeout, env=_env())
    except subprocess.TimeoutExpired:
        pytest.fail(f"digitlens {' '.join(args)}: still running after {timeout} s")
    assert done.returncode == 0, f"digitlens {' '.join(args)} failed:\n{done.stderr[-3000:]}"
    return done


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts its workers in sessions of their own, so killing
    torchrun's process group would leave them running)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    parent = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _weights(run):
    return load_file(str(run / "model.safetensors"))


def test_device_names():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else resolve_device("auto").type)
    with pytest.raises(DigitlensError, match="--device 'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DigitlensError, match="CUDA is not available"):
            resolve_device("cuda:0")
        with pytest.raises(DigitlensError, match="only on a CUDA device"):
            check_precision("bf16", torch.device("cpu"))
    with pytest.raises(DigitlensError, match="choose fp32 or bf16"):
        check_precision("fp16", torch.device("cpu"))


@pytest.mark.slow
def test_device_env_and_cli_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("DIGITLENS_DEVICE", "cpu")
    assert resolve_device(None) == torch.device("cpu")
    done = subprocess.run([sys.executable, "-m", "digitlens", "train", "--out", str(tmp_path / "r"), "--device", "tpu"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "error: --device 'tpu': unknown device (choose auto, cpu, cuda, cuda:N or mps)"]


def test_strip_nproc():
    assert strip_nproc(["train", "--nproc", "2", "--out", "x"]) == ["train", "--out", "x"]
    assert strip_nproc(["explain", "r", "--nproc=4"]) == ["explain", "r"]


@pytest.mark.slow
def test_two_gloo_processes_train_one_run_and_explain_like_one_process(tmp_path):
    """`train --nproc 2` (torchrun, gloo, 127.0.0.1): one run folder written by rank 0, accuracy in the
    band of one process; `explain --nproc 2`: the per-digit maps equal one process's within float
    tolerance."""
    from digitlens.explain.maps import load_maps
    from digitlens.explain.run import explain_model
    from digitlens.explain.run import load_run_split
    from digitlens.models import load_model
    from digitlens.train import train

    two, one = tmp_path / "two", tmp_path / "one"
    _digitlens("train", "--out", str(two), "--nproc", "2", "--no-progress")  # digits, 8 epochs
    train(one, dataset="digits", progress=False, threads=1, device="cpu")

    config = json.loads((two / "config.json").read_text())
    assert config["world_size"] == 2 and config["device"] == "cpu"
    assert sorted(p.name for p in two.iterdir()) == ["checkpoints", "config.json", "history.csv", "model.safetensors",
                                                      "train_summary.json"]
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == [f"epoch_{e:03d}.pt" for e in range(1, 9)]
    history = (two / "history.csv").read_text().strip().splitlines()
    assert len(history) == 9  # header + 8 epochs, written once (by rank 0)
    val_two = json.loads((two / "train_summary.json").read_text())["final"]["val_accuracy"]
    val_one = json.loads((one / "train_summary.json").read_text())["final"]["val_accuracy"]
    # Same accuracy band, not the same bits: batch norm sees half batches on each rank.
    assert val_two > 0.95 and abs(val_two - val_one) < 0.03, (val_two, val_one)
    a, b = _weights(two), _weights(one)
    assert any(not torch.equal(a[k], b[k]) for k in a)

    methods = "saliency,integrated_gradients,gradcam"
    _digitlens("explain", str(two), "--nproc", "2", "--methods", methods, "--faithfulness-size", "0",
               "--no-progress")
    data = load_run_split(two, "test")
    single = explain_model(load_model(two), data.images, data.labels.numpy(), methods=methods.split(","),
                           faithfulness_size=0, device="cpu")
    metrics = json.loads((two / "explain" / "explain_metrics.json").read_text())
    assert metrics["n_images"] == len(data) and sum(metrics["counts"]) == len(data)
    for method in methods.split(","):
        saved = load_maps(two, method)
        np.testing.assert_allclose(saved["maps"], single["maps"][method], rtol=1e-5, atol=1e-9, err_msg=method)
        np.testing.assert_allclose(saved["pixel_maps"], single["pixel_maps"][method], rtol=1e-5, atol=1e-9)
        assert saved["counts"].tolist() == single["counts"].tolist()
    assert metrics["integrated_gradients"]["mean_steps"] == pytest.approx(single["integrated_gradients"]["mean_steps"])


@pytest.mark.slow
def test_killed_two_process_run_resumes_to_the_same_weights(tmp_path):
    """SIGKILL the whole torchrun job once its first checkpoint exists, resume it with `--nproc 2
    --resume`, and compare with an uninterrupted 2-process run: the same weights."""
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    args = ["train", "--epochs", "4", "--nproc", "2", "--no-progress", *TINY_VIT]
    proc = subprocess.Popen([sys.executable, "-m", "digitlens", *args, "--out", str(killed)], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    first = killed / "checkpoints" / "epoch_001.pt"
    deadline = time.monotonic() + JOB_TIMEOUT
    try:
        while not first.exists():
            if proc.poll() is not None:
                pytest.fail(f"torchrun exited early: {proc.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"no checkpoint after {JOB_TIMEOUT} s")
            time.sleep(0.005)
    finally:  # torchrun and both training processes, as a crash or an OOM kill would
        for pid in [proc.pid, *_descendants(proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
        proc.stderr.close()
    assert not (killed / "model.safetensors").exists(), "the run finished before it was killed"
    done_before = len(list((killed / "checkpoints").glob("epoch_*.pt")))
    assert 1 <= done_before < 4

    _digitlens("train", "--out", str(killed), "--resume", "--nproc", "2", "--no-progress")
    _digitlens(*args, "--out", str(whole))
    summary = json.loads((killed / "train_summary.json").read_text())
    assert summary["resumed_from_epoch"] == done_before and summary["world_size"] == 2
    a, b = _weights(killed), _weights(whole)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_nproc_errors(tmp_path):
    done = subprocess.run([sys.executable, "-m", "digitlens", "train", "--out", str(tmp_path / "r"), "--nproc", "2",
                           "--seeds", "0,1"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--nproc and --seeds" in done.stderr and "Traceback" not in done.stderr


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on a lent device machine)")


@pytest.mark.slow
@needs_cuda
def test_a_gpu_run_evaluates_explains_and_resumes_on_the_cpu(tmp_path):
    from digitlens.evaluate import evaluate_run
    from digitlens.explain.run import explain_model
    from digitlens.explain.run import load_run_split
    from digitlens.models import load_model
    from digitlens.train import train

    run = tmp_path / "gpu"
    train(run, dataset="digits", epochs=3, progress=False, device="cuda", precision="bf16")
    config = json.loads((run / "config.json").read_text())
    assert config["device"].startswith("cuda") and config["precision"] == "bf16"
    cpu_eval = evaluate_run(run, device="cpu", progress=False)
    assert cpu_eval["accuracy"] > 0.8
    # the last epoch lost: resume it on the CPU from the GPU's checkpoint
    (run / "checkpoints" / "epoch_003.pt").unlink()
    (run / "model.safetensors").unlink()
    summary = train(run, resume=True, progress=False, device="cpu")
    assert summary["resumed_from_epoch"] == 2 and summary["device"] == "cpu"
    data = load_run_split(run, "test")
    model = load_model(run)
    on_gpu = explain_model(model, data.images, data.labels.numpy(), methods=["saliency", "gradcam"],
                           faithfulness_size=0, device="cuda")
    on_cpu = explain_model(model, data.images, data.labels.numpy(), methods=["saliency", "gradcam"],
                           faithfulness_size=0, device="cpu")
    for method in ("saliency", "gradcam"):
        np.testing.assert_allclose(on_gpu["maps"][method], on_cpu["maps"][method], rtol=2e-3, atol=1e-6)
    np.testing.assert_array_equal(on_gpu["y_pred"], on_cpu["y_pred"])


@pytest.mark.slow
def test_nproc_forwards_every_given_option_to_torchrun(monkeypatch, tmp_path):
    """`--nproc` rebuilds the command line for torchrun's processes from the parsed options: every
    option given (repeated ones and --no-flags too), nothing left at its default, no --nproc."""
    from typer.testing import CliRunner

    import digitlens.distributed
    from digitlens.cli import app

    seen = {}

    def fake_launch(args, nproc, timeout=None):
        seen["args"], seen["nproc"] = args, nproc
        return 0

    monkeypatch.setattr(digitlens.distributed, "launch", fake_launch)
    result = CliRunner().invoke(app, ["train", "--out", str(tmp_path / "r"), "--nproc", "3", "--width", "8",
                                      "--width", "16", "--width", "32", "--epochs", "2", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert seen["nproc"] == 3
    assert seen["args"] == ["train", "--out", str(tmp_path / "r"), "--epochs", "2", "--width", "8", "--width", "16",
                            "--width", "32", "--no-progress"]
    result = CliRunner().invoke(app, ["explain", str(tmp_path / "r"), "--nproc", "2", "--methods", "saliency",
                                      "--faithfulness-size", "0"])
    assert result.exit_code == 0, result.output
    assert seen["args"] == ["explain", str(tmp_path / "r"), "--methods", "saliency", "--faithfulness-size", "0"]
