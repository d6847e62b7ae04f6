"""Training: the run folder's files, reproducibility, resuming a killed run, bad arguments."""

import csv
import os
import signal
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from sklearn.metrics import accuracy_score
from typer.testing import CliRunner

from digitlens.cli import app
from digitlens.data import load_splits
from digitlens.errors import DigitlensError
from digitlens.models import load_model
from digitlens.runio import read_json
from digitlens.train import HISTORY_COLUMNS, random_shift, train

# A small, fast configuration on sklearn's digits; one thread so runs are bitwise reproducible
# whatever the machine.
FAST = dict(dataset="digits", model="cnn", model_kwargs={"widths": [4, 8, 8]}, batch_size=64, threads=1,
            progress=False)


def _weights(run_dir: Path) -> dict:
    return load_file(str(run_dir / "model.safetensors"))


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_run_folder_files(tmp_path):
    out = tmp_path / "run"
    summary = train(out, epochs=2, seed=3, **FAST)
    config = read_json(out / "config.json")
    for key in ("dataset", "model", "model_kwargs", "n_classes", "seed", "val_fraction", "data_dir", "epochs",
                "batch_size", "optimizer", "lr", "schedule", "versions"):
        assert key in config, key
    assert config["seed"] == 3 and config["epochs"] == 2 and config["n_classes"] == 10
    assert set(config["versions"]) >= {"torch", "numpy", "sklearn", "python", "digitlens"}

    with open(out / "history.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0].keys()) == HISTORY_COLUMNS
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert all(float(r["seconds"]) > 0 and 0 <= float(r["val_accuracy"]) <= 1 for r in rows)

    # One checkpoint per epoch, loadable without pickle.
    for epoch in (1, 2):
        state = torch.load(out / "checkpoints" / f"epoch_{epoch:03d}.pt", weights_only=True)
        assert state["epoch"] == epoch and {"model", "optimizer", "scheduler", "torch_rng"} <= set(state)
    assert (out / "train_summary.json").is_file() and summary["epochs"] == 2

    # history's val_accuracy of the last epoch is the saved model's accuracy on the validation split,
    # recomputed independently with scikit-learn.
    model = load_model(out)
    val = load_splits("digits", val_fraction=config["val_fraction"], seed=3).val
    with torch.no_grad():
        predicted = model(val.images).argmax(1).numpy()
    assert float(rows[-1]["val_accuracy"]) == pytest.approx(accuracy_score(val.labels.numpy(), predicted), abs=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("train_eval_size", [None, 500])
def test_train_eval_columns_equal_plain_cross_entropy_of_the_saved_model(tmp_path, monkeypatch, train_eval_size):
    """train_eval_loss / train_eval_accuracy of the last epoch are the saved model's plain cross-entropy
    (no label smoothing, no augmentation, eval mode) and accuracy on the first train_eval_size training
    images, recomputed here independently."""
    import torch.nn.functional as F

    import digitlens.train as train_module

    if train_eval_size is not None:
        monkeypatch.setattr(train_module, "TRAIN_EVAL_SIZE", train_eval_size)
    out = tmp_path / "run"
    train(out, epochs=1, seed=2, label_smoothing=0.1, augment=1, **FAST)
    config = read_json(out / "config.json")
    splits = load_splits("digits", val_fraction=config["val_fraction"], seed=2)
    expected_n = min(train_eval_size or train_module.TRAIN_EVAL_SIZE, len(splits.train))
    assert config["train_eval_size"] == expected_n
    with open(out / "history.csv", newline="") as fh:
        last = list(csv.DictReader(fh))[-1]
    model = load_model(out).eval()
    x, y = splits.train.images[:expected_n], splits.train.labels[:expected_n]
    with torch.no_grad():
        logits = model(x)
    assert float(last["train_eval_loss"]) == pytest.approx(float(F.cross_entropy(logits, y)), abs=1e-5)
    assert float(last["train_eval_accuracy"]) == pytest.approx(float((logits.argmax(1) == y).double().mean()),
                                                               abs=1e-12)
    # ...and not Keras' in-epoch, label-smoothed loss, which is recorded beside it unchanged.
    assert float(last["loss"]) != pytest.approx(float(last["train_eval_loss"]), abs=1e-3)


@pytest.mark.slow
def test_default_cnn_learns_digits(tmp_path):
    summary = train(tmp_path / "run", dataset="digits", model="cnn", epochs=4, threads=1, progress=False)
    assert summary["final"]["val_accuracy"] > 0.9


@pytest.mark.slow
def test_same_seed_same_weights_other_seed_other_weights(tmp_path):
    train(tmp_path / "a", epochs=2, seed=0, **FAST)
    train(tmp_path / "b", epochs=2, seed=0, **FAST)
    train(tmp_path / "c", epochs=2, seed=1, **FAST)
    _assert_same_weights(_weights(tmp_path / "a"), _weights(tmp_path / "b"))
    a, c = _weights(tmp_path / "a"), _weights(tmp_path / "c")
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.slow
def test_resume_after_kill_gives_identical_weights(tmp_path):
    """Start a real training process, SIGKILL it once its first checkpoint exists, resume, and compare
    with an uninterrupted run: the weights must be bitwise equal."""
    epochs = 4
    killed = tmp_path / "killed"
    code = ("from digitlens.train import train; "
            f"train({str(killed)!r}, epochs={epochs}, seed=5, dataset='digits', model='vit', "
            "model_kwargs={'dim': 16, 'depth': 1, 'heads': 2, 'mlp_dim': 16}, batch_size=64, threads=1, progress=False)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = killed / "checkpoints" / "epoch_001.pt"
    deadline = time.monotonic() + 120
    while not first.exists():
        if proc.poll() is not None:
            pytest.fail(f"training process exited early: {proc.stderr.read().decode()[-500:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("no checkpoint after 120 s")
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "model.safetensors").exists(), "the run finished before it was killed"
    done_before = sorted(p.name for p in (killed / "checkpoints").glob("epoch_*.pt"))
    assert 1 <= len(done_before) < epochs

    summary = train(killed, resume=True, progress=False)
    assert summary["resumed_from_epoch"] == len(done_before)

    whole = tmp_path / "whole"
    train(whole, epochs=epochs, seed=5, dataset="digits", model="vit",
          model_kwargs={"dim": 16, "depth": 1, "heads": 2, "mlp_dim": 16}, batch_size=64, threads=1, progress=False)
    _assert_same_weights(_weights(killed), _weights(whole))
    with open(killed / "history.csv") as fh_a, open(whole / "history.csv") as fh_b:
        rows_a, rows_b = list(csv.DictReader(fh_a)), list(csv.DictReader(fh_b))
    for column in HISTORY_COLUMNS:
        if column != "seconds":
            assert [r[column] for r in rows_a] == [r[column] for r in rows_b], column
    assert all(r["train_eval_loss"] != "" for r in rows_a)


@pytest.mark.slow
def test_refusals(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(DigitlensError, match="no run to resume"):
        train(out, resume=True, **FAST)
    train(out, epochs=1, **FAST)
    with pytest.raises(DigitlensError, match="already holds a finished run"):
        train(out, epochs=1, **FAST)
    with pytest.raises(DigitlensError, match="model='cnn', not 'mlp'"):
        train(out, resume=True, model="mlp", progress=False)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("x")
    with pytest.raises(DigitlensError, match="not empty"):
        train(tmp_path / "junk", epochs=1, **FAST)
    # A started run without a checkpoint (killed in its first epoch) is not stuck: a fresh train
    # says to pass --resume, and --resume restarts it from epoch 1, as an uninterrupted run.
    started = tmp_path / "started"
    train(started, epochs=2, **FAST)
    (started / "model.safetensors").unlink()
    (started / "train_summary.json").unlink()
    shutil.rmtree(started / "checkpoints")
    with pytest.raises(DigitlensError, match="pass --resume"):
        train(started, epochs=2, **FAST)
    summary = train(started, resume=True, progress=False)
    assert summary["resumed_from_epoch"] == 0 and summary["epochs"] == 2
    train(tmp_path / "whole", epochs=2, **FAST)
    _assert_same_weights(_weights(started), _weights(tmp_path / "whole"))
    with pytest.raises(DigitlensError, match="unknown hyper-parameter 'learning_rate'"):
        train(tmp_path / "x", learning_rate=0.1, progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("args,needle", [
    (["--model", "resnet"], "--model 'resnet': unknown model"),
    (["--dataset", "cifar"], "--dataset 'cifar': unknown dataset"),
    (["--epochs", "0"], "--epochs 0"),
])
def test_cli_bad_arguments_exit_2_with_one_line(tmp_path, args, needle):
    result = CliRunner().invoke(app, ["train", "--out", str(tmp_path / "run"), "--no-progress", *args])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and lines[0].startswith("error:")


@pytest.mark.slow
def test_cli_trains_then_refuses_a_second_run(tmp_path):
    out = tmp_path / "run"
    runner = CliRunner()
    result = runner.invoke(app, ["train", "--out", str(out), "--epochs", "1", "--width", "4", "--width", "8",
                                 "--width", "8", "--threads", "1", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert read_json(out / "config.json")["model_kwargs"]["widths"] == [4, 8, 8]
    result = runner.invoke(app, ["train", "--out", str(out), "--no-progress"])
    assert result.exit_code == 2 and "already holds a finished run" in result.stderr


def test_random_shift_matches_naive_shift():
    x = torch.rand(6, 1, 28, 28)
    gen = torch.Generator().manual_seed(0)
    shifted = random_shift(x, 2, gen)
    gen = torch.Generator().manual_seed(0)
    dy = torch.randint(0, 5, (6,), generator=gen)
    dx = torch.randint(0, 5, (6,), generator=gen)
    padded = np.pad(x.numpy(), ((0, 0), (0, 0), (2, 2), (2, 2)))
    for i in range(6):
        expected = padded[i, :, dy[i]:dy[i] + 28, dx[i]:dx[i] + 28]
        np.testing.assert_array_equal(shifted[i].numpy(), expected)


def test_long_cnn_runs_on_mnist_use_the_long_settings_unless_overridden():
    from digitlens.train import LONG_RUN_HYPER, resolve_hyper

    short = resolve_hyper("cnn", "mnist", {}, 1)
    long = resolve_hyper("cnn", "mnist", {}, 6)
    assert short.batch_size == 128 and short.augment == 0
    assert long == LONG_RUN_HYPER["cnn"] and (long.batch_size, long.augment, long.label_smoothing) == (256, 1, 0.0)
    assert resolve_hyper("cnn", "mnist", {"batch_size": 64}, 6).batch_size == 64
    assert resolve_hyper("cnn", "digits", {}, 6).augment == 0


# --------------------------------------------------------------------------- TrainConfig

# config.json as `digitlens train --dataset digits --epochs 2 --seed 0` wrote it before TrainConfig
# (main at bf6f18f; the recorded facts after "channels_last" shortened).
CONFIG_BEFORE_TRAINCONFIG = {
    "dataset": "digits", "model": "cnn",
    "model_kwargs": {"widths": [16, 32, 64], "in_channels": 1, "image_size": 28, "pool_ceil": True},
    "seed": 0, "data_dir": None, "image_size": 28, "epochs": 2, "batch_size": 32, "optimizer": "sgd", "lr": 0.2,
    "momentum": 0.9, "nesterov": True, "weight_decay": 0.0005, "label_smoothing": 0.1, "schedule": "onecycle",
    "pct_start": 0.25, "augment": 0, "val_fraction": 0.1, "threads": None, "channels_last": True,
    "n_classes": 10, "n_parameters": 23466, "n_train": 1212, "threads_used": 2, "train_eval_size": 1212,
}


def test_train_config_writes_config_json_as_before_and_reads_it_back():
    from digitlens.train import RECORDED_KEYS, TrainConfig

    config = TrainConfig.create(dataset="digits", epochs=2, seed=0)
    settings = {k: v for k, v in CONFIG_BEFORE_TRAINCONFIG.items() if k not in RECORDED_KEYS}
    assert list(config.to_json().items()) == list(settings.items())  # same keys, values and order
    assert TrainConfig.from_json(CONFIG_BEFORE_TRAINCONFIG) == config
    assert TrainConfig.from_json(config.to_json()) == config
    unverified = TrainConfig.create(dataset="digits", verify=False)
    assert unverified.to_json()["verify"] is False and TrainConfig.from_json(unverified.to_json()) == unverified


def test_train_config_fills_hyper_parameters_an_older_config_lacks():
    from digitlens.train import DEFAULT_HYPER, TrainConfig

    older = {k: v for k, v in CONFIG_BEFORE_TRAINCONFIG.items() if k not in ("channels_last", "threads", "pct_start")}
    config = TrainConfig.from_json(older)
    assert config.hyper.pct_start == DEFAULT_HYPER["cnn"].pct_start and config.hyper.batch_size == 32
    with pytest.raises(DigitlensError, match=r"run/config.json: missing key 'epochs'"):
        TrainConfig.from_json({k: v for k, v in older.items() if k != "epochs"}, "run/config.json")


@pytest.mark.parametrize("overrides,needle", [
    ({"optimizer": "adam"}, "--optimizer 'adam': choose from sgd, adamw"),
    ({"schedule": "cosine"}, "--schedule 'cosine': choose from onecycle, constant"),
    ({"val_fraction": 1.0}, "--val-fraction 1.0: must be in [0, 1)"),
    ({"batch_size": 1}, "--batch-size 1: must be at least 2"),
    ({"batch_size": 2.5}, "--batch-size 2.5: expected a whole number"),
    ({"lr": 0}, "--lr 0.0: must be positive"),
    ({"lr": "fast"}, "--lr 'fast': expected a number"),
    ({"augment": -1}, "--augment -1: must be 0"),
    ({"threads": 0}, "--threads 0: must be at least 1"),
    ({"label_smoothing": 1.5}, "train: label_smoothing 1.5"),
    ({"pct_start": 0}, "train: pct_start 0.0"),
    ({"epochs": 0}, "--epochs 0: must be at least 1"),
    ({"model": "resnet"}, "--model 'resnet': unknown model"),
    ({"dataset": "cifar"}, "--dataset 'cifar': unknown dataset"),
    ({"model_kwargs": {"depthh": 2}}, "model_kwargs: cnn has no argument 'depthh'"),
    ({"learning_rate": 0.1}, "train: unknown hyper-parameter 'learning_rate'"),
])
def test_train_config_refuses_bad_values_in_one_line_naming_the_flag(overrides, needle):
    from digitlens.train import TrainConfig

    with pytest.raises(DigitlensError) as info:
        TrainConfig.create(**overrides)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_defaults_are_checked_where_they_are_defined():
    import dataclasses

    from digitlens.train import DEFAULT_HYPER, DEFAULT_MODEL_KWARGS, Hyper

    assert all(isinstance(h, Hyper) for h in DEFAULT_HYPER.values())
    with pytest.raises(DigitlensError, match="--optimizer 'adam'"):
        dataclasses.replace(DEFAULT_HYPER["cnn"], optimizer="adam")
    with pytest.raises(TypeError):  # read-only: a typo cannot change every later run's defaults
        DEFAULT_MODEL_KWARGS["vit"]["depth"] = 3


@pytest.mark.slow
def test_train_leaves_the_callers_global_rng_as_it_was(tmp_path):
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    train(tmp_path / "run", epochs=1, **FAST)
    assert torch.equal(torch.rand(3), expected)


def test_config_pins_the_full_architecture(tmp_path):
    from digitlens.models import ViT
    from digitlens.train import DEFAULT_MODEL_KWARGS, full_model_kwargs

    kwargs = full_model_kwargs("vit", {"heads": 2})
    assert kwargs["heads"] == 2 and kwargs["depth"] == DEFAULT_MODEL_KWARGS["vit"]["depth"]
    assert kwargs["dim"] >= 128 and kwargs["patch"] == 4
    assert len(ViT(**kwargs).blocks) == kwargs["depth"]
    with pytest.raises(DigitlensError, match="no argument 'depthh'"):
        full_model_kwargs("vit", {"depthh": 2})


@pytest.mark.slow
def test_train_leaves_the_callers_thread_count_as_it_was(tmp_path):
    import torch

    before = torch.get_num_threads()
    train(tmp_path / "run", **dict(FAST, threads=1 if before != 1 else 2), epochs=1)
    assert torch.get_num_threads() == before
