"""The ``digitlens`` command line: parses arguments and calls the Python API, nothing more.

Every command turns a :class:`DigitlensError` into one line ``error: ...`` on stderr and exit
status 2, never a traceback.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from digitlens import distributed, evaluate
from digitlens.adapt import adapt_run
from digitlens.demo import run_demo
from digitlens.errors import DigitlensError
from digitlens.explain.run import explain_run
from digitlens.explain.methods import IG_TOLERANCE
from digitlens.external import LAYOUTS, parse_normalize
from digitlens.figure_writer import default_figure_workers
from digitlens.intervals import DEFAULT_BOOTSTRAP
from digitlens.predict import predict_images
from digitlens.report import write_report
from digitlens.seeds import is_group, parse_seeds, summarise_group, train_seeds
from digitlens.serve import serve
from digitlens.subspace.run import analyse_adapters, analyse_run
from digitlens.train import train, width_kwargs

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Train handwritten-digit recognisers and see what they learned and where they fail.")


def one_line_errors(func):
    """Run ``func``; a DigitlensError becomes ``error: <message>`` on stderr and exit status 2."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except DigitlensError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(code=2) from None
        except (FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError) as exc:
            # A path argument that names the wrong kind of thing (an --out that is a file) or one
            # we may not write: the OS names the path; one line like every other bad input.
            typer.echo(f"error: {exc.filename}: {exc.strerror.lower()}", err=True)
            raise typer.Exit(code=2) from None

    return wrapper


@app.callback()
def main() -> None:
    """Train handwritten-digit recognisers and see what they learned and where they fail."""
    # Commands draw figures in worker processes (figure_writer.FigureWriter): safe here, where the main
    # module is this guarded entry point; the Python API leaves it to the user (a script needs an
    # `if __name__ == "__main__":` guard for multiprocessing).

    os.environ.setdefault("DIGITLENS_FIGURE_WORKERS", str(default_figure_workers()))


# Commands are added below, one function per command, each calling one API function.

DEVICE_HELP = "auto (default: CUDA when available, else the CPU), cpu, cuda, cuda:N or mps."
NPROC_HELP = "Run in N processes with torchrun (DistributedDataParallel on gloo/NCCL); 1 = this process."


def _is_rank0() -> bool:
    """False in the processes torchrun starts besides rank 0 (they print nothing)."""
    return os.environ.get("RANK", "0") == "0"


def _forward_args(ctx: typer.Context, skip: tuple[str, ...] = ("nproc",)) -> list[str]:
    """The command line of ``ctx`` rebuilt from its parsed values (defaults left out, ``skip`` dropped):
    what each torchrun process runs."""
    args = [ctx.info_name]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if param.name in skip or value is None:
            continue
        if param.param_type_name == "argument":
            args.append(str(value))
        elif value == param.default:
            continue
        elif getattr(param, "is_flag", False):
            if value:
                args.append(param.opts[0])
            elif param.secondary_opts:
                args.append(param.secondary_opts[0])
        elif getattr(param, "multiple", False):
            for item in value:
                args += [param.opts[0], str(item)]
        else:
            args += [param.opts[0], str(value)]
    return args


def _run_with_torchrun(ctx: typer.Context, nproc: int) -> None:

    code = distributed.launch(_forward_args(ctx), nproc)
    if code:
        raise DigitlensError(f"--nproc {nproc}: torchrun exited with status {code} (its processes' errors are above)")
INPUT_SCALE_HELP = "A user's model (--model-file): pixels it expects, 1 ([0, 1], default) or 255 ([0, 255])."
NORMALIZE_HELP = "A user's model: MEAN,STD it normalises the scaled pixels with, e.g. 0.1307,0.3081."
TRUST_HELP = ("Load a TorchScript --model-file: it is code that runs when loaded, so only for a file from a source "
              "you trust (ONNX files and digitlens runs need no trust).")
OUTPUTS_HELP = "A user's model: what it returns, auto (detected, default), logits, probs or log_probs."


def preprocessing_flags(input_scale: Optional[int], normalize: Optional[str], outputs: Optional[str]) -> Optional[dict]:
    """The --input-scale/--normalize/--outputs given, as a preprocessing dict (None when none is)."""
    flags = {"input_scale": input_scale, "normalize": parse_normalize(normalize), "outputs": outputs}
    flags = {k: v for k, v in flags.items() if v is not None}
    return flags or None


def describe_user_model(info: dict) -> str:
    """One line: the user's model, the layout it was fed and what its outputs were taken as."""
    prep = info["preprocessing"]
    shape = "(N, " + ", ".join(str(s) for s in LAYOUTS[info["layout"]]) + ")"
    norm = f", normalize {prep['normalize'][0]:g},{prep['normalize'][1]:g}" if prep.get("normalize") else ""
    return (f"model {Path(info['model_file']).name if info.get('model_file') else 'module'} ({info['format']}): "
            f"input {shape}, input scale {prep['input_scale']}{norm}, outputs {info['outputs']}"
            f" ({'detected' if info['outputs_detected'] else 'declared'})")


@app.command("train")
@one_line_errors
def train_command(
    ctx: typer.Context,
    out: Path = typer.Option(..., "--out", help="Run folder to create (runs/NAME)."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="mnist or digits (default digits; with --resume: the run's)."),
    model: Optional[str] = typer.Option(None, "--model", help="cnn (default), mlp or vit."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Epochs (default: the fast per-model setting, 1 for cnn on mnist)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed (default 0)."),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="Comma-separated seeds (0,1,2): one run per seed in --out/seed_S/ plus --out/group.json."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Folder with the MNIST IDX files."),
    resume: bool = typer.Option(False, "--resume", help="Continue the killed run in --out from its last checkpoint."),
    width: Optional[list[int]] = typer.Option(None, "--width", help="Repeat for each width: cnn 3 channel counts, mlp hidden sizes, vit one embedding dim."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Batch size (default per model)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate of the one-cycle schedule."),
    augment: Optional[int] = typer.Option(None, "--augment", help="Random shifts of up to this many pixels (0 = off)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads (default: torch's)."),
    val_fraction: Optional[float] = typer.Option(None, "--val-fraction", help="Share of the training images held out for validation (default 0.1; 0 = none)."),
    optimizer: Optional[str] = typer.Option(None, "--optimizer", help="sgd or adamw (default per model)."),
    schedule: Optional[str] = typer.Option(None, "--schedule", help="onecycle or constant (default onecycle)."),
    device: Optional[str] = typer.Option(None, "--device", help=DEVICE_HELP),
    precision: Optional[str] = typer.Option(None, "--precision", help="fp32 (default) or bf16 (autocast; CUDA only)."),
    nproc: Optional[int] = typer.Option(None, "--nproc", help=NPROC_HELP),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Check that MNIST files are the canonical ones (SHA-256); --no-verify trains on a deliberate variant."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Train a digit classifier; write config.json, history.csv, checkpoints/ and model.safetensors
    (with --seeds: one such run folder per seed, --out/seed_S/, and --out/group.json)."""
    extra = {k: v for k, v in (("val_fraction", val_fraction), ("optimizer", optimizer), ("schedule", schedule))
             if v is not None}
    if nproc is not None and nproc != 1:
        if seeds is not None:
            raise DigitlensError("--nproc and --seeds: train the seeds one after another without --nproc, or one seed with it")
        if nproc < 1:
            raise DigitlensError(f"--nproc {nproc}: must be at least 1")
        _run_with_torchrun(ctx, nproc)
        return
    extra.update(device=device, precision=precision)
    if not verify:
        extra["verify"] = False
    if seeds is not None:

        if seed is not None:
            raise DigitlensError("--seed and --seeds: give one or the other")
        group = train_seeds(out, parse_seeds(seeds), dataset=dataset, model=model, epochs=epochs, data_dir=data_dir,
                            resume=resume, progress=progress, model_kwargs=width_kwargs(model, width),
                            batch_size=batch_size, lr=lr, augment=augment, threads=threads, **extra)
        for rel, s in zip(group["runs"], group["summaries"]):
            typer.echo(f"wrote {Path(out) / rel}: " + ("already finished" if s is None else
                       f"{s['epochs']} epochs, {s['train_seconds']:.1f} s of training"))
        typer.echo(f"wrote {Path(out) / 'group.json'}: {len(group['seeds'])} seeds")
        return
    summary = train(out, dataset=dataset, model=model, epochs=epochs, seed=seed, data_dir=data_dir, resume=resume,
                    progress=progress, model_kwargs=width_kwargs(model, width), batch_size=batch_size, lr=lr,
                    augment=augment, threads=threads, **extra)
    if not _is_rank0():
        return
    val_accuracy = summary["final"]["val_accuracy"]
    typer.echo(f"wrote {summary['run_dir']}: {summary['epochs']} epochs, {summary['train_seconds']:.1f} s of training"
               + (f", val_accuracy {val_accuracy:.4f}" if val_accuracy == val_accuracy else ""))


@app.command("evaluate")
@one_line_errors
def evaluate_command(
    run_dir: Optional[Path] = typer.Argument(None, help="Run folder from `digitlens train` (omit with --model-file --dataset --out)."),
    model_file: Optional[Path] = typer.Option(None, "--model-file", help="A model file to evaluate: ONNX (.onnx) or TorchScript (needs --trust-code: it is code)."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Folder with the MNIST IDX files."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="mnist, digits (their test split), an image folder root/0..9/ or a Kaggle .csv (all of it). With a run folder: evaluate the run's model on it."),
    out: Optional[Path] = typer.Option(None, "--out", help="Where to write predictions, metrics, insights and figures (with a run folder and --dataset: default RUN_DIR/evaluate/NAME)."),
    history: Optional[Path] = typer.Option(None, "--history", help="Without a run folder: training history (Keras CSVLogger .csv or history.history .json)."),
    device: Optional[str] = typer.Option(None, "--device", help=DEVICE_HELP),
    bootstrap: int = typer.Option(DEFAULT_BOOTSTRAP, "--bootstrap", help="Resamples of the test images behind the 95% intervals of per-digit scores, macro F1 and ECE (0 = Wilson accuracy interval only)."),
    input_scale: Optional[int] = typer.Option(None, "--input-scale", help=INPUT_SCALE_HELP),
    normalize: Optional[str] = typer.Option(None, "--normalize", help=NORMALIZE_HELP),
    outputs: Optional[str] = typer.Option(None, "--outputs", help=OUTPUTS_HELP),
    trust_code: bool = typer.Option(False, "--trust-code", help=TRUST_HELP),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Predict the test split; write predictions.npz, metrics.json, insights.md/json and figures/
    (for --model-file also config.json, so explain and report on --out use the same model and flags)."""
    if run_dir is not None and is_group(run_dir):  # a `train --seeds` folder: every seed run, then the spread
        if model_file is not None or dataset is not None or out is not None or history is not None:
            raise DigitlensError(f"{run_dir}: a group of seed runs takes no --model-file/--dataset/--out/--history")
        group = summarise_group(run_dir, data_dir=data_dir, progress=progress, bootstrap=bootstrap, reevaluate=True,
                                device=device)
        typer.echo(f"{group['sentence']}\nwrote {Path(run_dir) / 'group_summary.json'}")
        return
    if run_dir is not None:
        if history is not None:
            raise DigitlensError("--history: only used without a run folder (the run folder has it)")
        summary = evaluate.evaluate_run(run_dir, model=model_file, data_dir=data_dir, progress=progress,
                                        dataset=dataset, out_dir=out, device=device, bootstrap=bootstrap,
                                        preprocessing=preprocessing_flags(input_scale, normalize, outputs),
                                        trust_code=trust_code)
    else:
        if model_file is None or dataset is None or out is None:
            raise DigitlensError("evaluate: give a run folder, or --model-file, --dataset and --out together")
        summary = evaluate.evaluate_model(model_file, dataset, out_dir=out, data_dir=data_dir, history=history,
                                          progress=progress, device=device, bootstrap=bootstrap,
                                          preprocessing=preprocessing_flags(input_scale, normalize, outputs),
                                          trust_code=trust_code)
    if summary["accuracy"] is None:  # a Kaggle test.csv: no labels, so predictions only
        typer.echo(f"{summary['n_samples']} images without labels: no accuracy; wrote "
                   f"{Path(summary['out_dir']) / 'predictions.csv'} (Kaggle submission format ImageId,Label)")
        return
    user = summary["source"].get("user_model")
    if user:
        typer.echo(describe_user_model(user))
    calibrated = (f" ({summary['ece_calibrated']:.4f} after temperature scaling, T = {summary['temperature']:.3f})"
                  if summary.get("temperature") is not None and summary.get("ece_calibrated") is not None else "")
    low, high = summary["accuracy_ci"]
    typer.echo(f"accuracy {summary['accuracy']:.4f} (95% Wilson interval {low:.4f}-{high:.4f})  "
               f"errors {summary['n_errors']}/{summary['n_samples']}  "
               f"macro F1 {summary['macro_f1']:.4f}  ECE {summary['ece']:.4f}{calibrated}")
    for sentence in summary["insights"][1:]:
        typer.echo(f"- {sentence}")
    typer.echo(f"wrote {summary['out_dir']}/metrics.json, insights.md and {len(summary['figures'])} figure files")


@app.command("explain")
@one_line_errors
def explain_command(
    ctx: typer.Context,
    run_dir: Path = typer.Argument(..., help="Run folder from `digitlens train` (runs/NAME)."),
    methods: Optional[str] = typer.Option(None, "--methods", help="Comma-separated: saliency, input_x_gradient, integrated_gradients, occlusion, gradcam, hirescam, attention, attention_rollout, feature_ablation, shapley_value_sampling (dashes work too; default: all that apply)."),
    group_by: str = typer.Option("true", "--group-by", help="Group images by true or predicted label, or by correct/incorrect."),
    grid: int = typer.Option(7, "--grid", help="Patch grid of the per-digit maps (7 = 4x4 patches on 28x28)."),
    compare: Optional[Path] = typer.Option(None, "--compare", help="A second run folder: side-by-side maps with the difference."),
    compare_methods: bool = typer.Option(False, "--compare-methods", help="Compare the first two --methods side by side."),
    split: str = typer.Option("test", "--split", help="train, val or test."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Folder with the MNIST IDX files."),
    faithfulness_size: int = typer.Option(500, "--faithfulness-size", help="Test images for the faithfulness verdict: ROAD, deletion/insertion, sanity checks (0 = skip)."),
    gradcam_layer: Optional[str] = typer.Option(None, "--gradcam-layer", help="Module name for Grad-CAM and HiResCAM (default: the last conv block whose whole map reaches the output; a partly cut-off layer is refused)."),
    ig_tolerance: Optional[float] = typer.Option(None, "--ig-tolerance", min=0.0, help="Integrated gradients: refine each image until its relative completeness error is at most this (default 0.02)."),
    ig_steps: Optional[int] = typer.Option(None, "--ig-steps", min=1, help="Integrated gradients: a fixed number of steps for every image (Captum's Gauss-Legendre rule) instead of --ig-tolerance."),
    image_index: int = typer.Option(0, "--image-index", help="The image of the split whose feature maps are drawn."),
    device: Optional[str] = typer.Option(None, "--device", help=DEVICE_HELP),
    nproc: Optional[int] = typer.Option(None, "--nproc", help=NPROC_HELP),
    input_scale: Optional[int] = typer.Option(None, "--input-scale", help=INPUT_SCALE_HELP + " Default: as recorded by evaluate --model-file --out."),
    normalize: Optional[str] = typer.Option(None, "--normalize", help=NORMALIZE_HELP),
    outputs: Optional[str] = typer.Option(None, "--outputs", help=OUTPUTS_HELP),
    trust_code: bool = typer.Option(False, "--trust-code", help=TRUST_HELP),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Per-digit attribution maps, overlays, filters and faithfulness; write RUN_DIR/explain/.
    RUN_DIR may be the --out folder of `evaluate --model-file` (a TorchScript or ONNX model; ONNX:
    occlusion by default, feature_ablation and shapley_value_sampling on request)."""
    if nproc is not None and nproc != 1:
        if nproc < 1:
            raise DigitlensError(f"--nproc {nproc}: must be at least 1")
        _run_with_torchrun(ctx, nproc)
        return
    ig_tolerance = IG_TOLERANCE if ig_tolerance is None else ig_tolerance
    summary = explain_run(run_dir, methods=methods, group_by=group_by, grid=grid, data_dir=data_dir, split=split,
                          progress=progress, compare=compare, compare_methods=compare_methods,
                          faithfulness_size=faithfulness_size, gradcam_layer=gradcam_layer, image_index=image_index,
                          ig_tolerance=ig_tolerance, ig_n_steps=ig_steps, device=device,
                          preprocessing=preprocessing_flags(input_scale, normalize, outputs), trust_code=trust_code)
    if summary is None:  # a torchrun process other than rank 0: rank 0 wrote and reports
        return
    verdict = summary.get("verdict")
    typer.echo(f"wrote {Path(run_dir) / 'explain'}: maps for {', '.join(summary['methods'])}; "
               f"{len(summary['files']['figures'])} figures" + (f"; {verdict}" if verdict else ""))


@app.command("predict")
@one_line_errors
def predict_command(
    model_or_run: Path = typer.Argument(..., help="A run folder (runs/NAME), a model file (TorchScript .pt or ONNX .onnx), or a folder of `evaluate --model-file --out`."),
    images: list[Path] = typer.Argument(..., help="Image files (PNG, JPEG, BMP): photos, scans or drawings of one digit each."),
    json_lines: bool = typer.Option(False, "--json", help="Print one JSON object per image: file, prediction, probabilities."),
    explain: Optional[str] = typer.Option(None, "--explain", help="Write an overlay PNG per image with this method (saliency, integrated_gradients, gradcam, occlusion, ...)."),
    show_steps: bool = typer.Option(False, "--show-steps", help="Write a PNG per image with the preprocessing stages side by side."),
    out: Path = typer.Option(Path("."), "--out", help="Folder for the --explain and --show-steps PNGs."),
    top: int = typer.Option(3, "--top", help="How many of the most probable digits to print."),
    input_scale: Optional[int] = typer.Option(None, "--input-scale", help=INPUT_SCALE_HELP),
    normalize: Optional[str] = typer.Option(None, "--normalize", help=NORMALIZE_HELP),
    outputs: Optional[str] = typer.Option(None, "--outputs", help=OUTPUTS_HELP),
    trust_code: bool = typer.Option(False, "--trust-code", help=TRUST_HELP),
) -> None:
    """Predict the digit in each image, after MNIST's own preprocessing (greyscale, polarity,
    crop to the ink, fit into 20x20, centre by mass in 28x28)."""
    results = predict_images(model_or_run, images, top=top, explain=explain, show_steps=show_steps, out_dir=out,
                             preprocessing=preprocessing_flags(input_scale, normalize, outputs), trust_code=trust_code)
    for r in results:
        if json_lines:
            keys = ("file", "prediction", "probabilities", "steps", "explanation")
            typer.echo(json.dumps({k: r[k] for k in keys if k in r}))
            continue
        ranked = ", ".join(f"{d} ({p:.1%})" for d, p in r["top"])
        typer.echo(f"{r['file']}: {ranked}")
        for key in ("steps", "explanation"):
            if key in r:
                typer.echo(f"  wrote {r[key]}")


@app.command("serve")
@one_line_errors
def serve_command(
    runs: Optional[list[Path]] = typer.Argument(None, help="Run folders (runs/NAME) whose models the page shows side by side."),
    model_file: Optional[list[Path]] = typer.Option(None, "--model-file", help="A model file to serve as well (ONNX, or TorchScript with --trust-code); repeatable."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (127.0.0.1: this machine only)."),
    port: int = typer.Option(8000, "--port", help="Port to listen on."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Folder with the MNIST IDX files (for browsing an MNIST run's test images)."),
    threads: int = typer.Option(1, "--threads", help="Torch threads for the models (1: fastest for the small batches of a shared machine)."),
    input_scale: Optional[int] = typer.Option(None, "--input-scale", help=INPUT_SCALE_HELP),
    normalize: Optional[str] = typer.Option(None, "--normalize", help=NORMALIZE_HELP),
    outputs: Optional[str] = typer.Option(None, "--outputs", help=OUTPUTS_HELP),
    trust_code: bool = typer.Option(False, "--trust-code", help=TRUST_HELP),
) -> None:
    """Serve a page on which you draw a digit and watch every model read it (probabilities,
    attribution maps, preprocessing steps), browse each run's mistakes, and its JSON API."""
    load_options = {"preprocessing": preprocessing_flags(input_scale, normalize, outputs), "trust_code": trust_code}
    serve(runs or [], host=host, port=port, model_files=model_file or [], data_dir=data_dir, threads=threads,
          load_options=load_options)


@app.command("report")
@one_line_errors
def report_command(
    run_dir: Path = typer.Argument(..., help="Run folder to report on (runs/NAME)."),
    compare: Optional[Path] = typer.Option(None, "--compare", help="A second run folder to show side by side."),
    bootstrap: int = typer.Option(DEFAULT_BOOTSTRAP, "--bootstrap", help="Resamples of the paired bootstrap (--compare; 0 = the default) and of seed runs evaluated for a group report."),
) -> None:
    """Write RUN_DIR/report.html: one self-contained page with every figure, table and insight."""
    typer.echo(f"wrote {write_report(run_dir, compare=compare, bootstrap=bootstrap)}")


@app.command("demo")
@one_line_errors
def demo_command(
    dataset: str = typer.Option("digits", "--dataset", help="digits (embedded, no download) or mnist."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Folder with the MNIST IDX files."),
    out_root: Path = typer.Option(Path("runs"), "--out", help="Folder that receives the demo's run folders."),
    device: Optional[str] = typer.Option(None, "--device", help=DEVICE_HELP),
    bootstrap: int = typer.Option(DEFAULT_BOOTSTRAP, "--bootstrap", help="Resamples of the test images behind the evaluation's intervals and the CNN-vs-ViT paired bootstrap."),
) -> None:
    """Train a CNN and a ViT, evaluate, explain, run the LoRA study and write the reports."""
    run_demo(out_root, dataset=dataset, data_dir=data_dir, device=device, bootstrap=bootstrap)


@app.command("adapt")
@one_line_errors
def adapt_command(
    run_dir: Path = typer.Argument(..., help="Base run folder (runs/NAME) with a trained ViT."),
    task: str = typer.Option("groups", "--task", help="groups (is the digit in {1,2,4,6,9}?), digits (sklearn digits) "
                             "or rotated (the run's own digits turned 90 degrees)."),
    ranks: str = typer.Option("4,8,64", "--ranks", help="Comma-separated LoRA ranks."),
    seeds: str = typer.Option("0,1", "--seeds", help="Comma-separated seeds."),
    targets: str = typer.Option("q,v", "--targets", help="Comma-separated linear layer names to adapt."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Most epochs per model: the learning-rate schedule's "
                                         "length (default 30; early stopping usually ends sooner)."),
    patience: Optional[int] = typer.Option(None, "--patience", help="Stop after this many epochs without a better "
                                           "validation accuracy (default 4)."),
    n_train: Optional[int] = typer.Option(None, "--n-train", help="Training images drawn from the task's train split (0 = all)."),
    n_test: Optional[int] = typer.Option(None, "--n-test", help="Test images (0 = all)."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Folder with the MNIST IDX files."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Print one line per epoch."),
    subspace: bool = typer.Option(True, "--subspace/--no-subspace",
                                  help="Then analyse the adapters' subspaces (as `digitlens subspace RUN_DIR --task T`)."),
    device: Optional[str] = typer.Option(None, "--device", help=DEVICE_HELP),
) -> None:
    """Train LoRA adapters (PEFT) per rank and seed plus head-only and full fine-tuning baselines,
    then (unless --no-subspace) write the subspace analysis: the whole LoRA study in one command."""
    results = adapt_run(run_dir, task=task, ranks=_int_list(ranks, "--ranks"), seeds=_int_list(seeds, "--seeds"),
                        targets=[t.strip() for t in targets.split(",") if t.strip()], epochs=epochs, n_train=n_train,
                        n_test=n_test, data_dir=data_dir, progress=progress, device=device, patience=patience)
    typer.echo(results["markdown"])
    if subspace:

        analyse_run(run_dir, task=task, progress=progress, device=device)
        typer.echo(f"subspace analysis written to {Path(run_dir) / 'subspace' / task}")


@app.command("subspace")
@one_line_errors
def subspace_command(
    run_dir: Optional[Path] = typer.Argument(None, help="Run folder whose adapters to analyse (or use --base/--adapter)."),
    task: str = typer.Option("groups", "--task", help="Which adapt/TASK of the run folder."),
    base: Optional[Path] = typer.Option(None, "--base", help="Base model weights (.safetensors) of any model."),
    adapter: Optional[list[Path]] = typer.Option(None, "--adapter", help="PEFT LoRA adapter folder; repeat to compare."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default RUN_DIR/subspace/TASK, or ADAPTER/subspace with --adapter)."),
    module: Optional[list[str]] = typer.Option(None, "--module", help="Analyse only this adapted module (repeat; default: all)."),
    device: Optional[str] = typer.Option(None, "--device", help="Where the SVDs run (float64): " + DEVICE_HELP),
) -> None:
    """Subspace similarity, amplification, spectra and intruder dimensions of LoRA adapters."""
    if run_dir is not None:
        summary = analyse_run(run_dir, task=task, out_dir=out, progress=True, device=device,
                              **({"modules": module} if module else {}))
    elif base is not None and adapter:
        summary = analyse_adapters(base, adapter, out if out is not None else Path(adapter[0]) / "subspace",
                                   modules=module or None, progress=True, device=device)
    else:
        raise DigitlensError("subspace: give RUN_DIR, or --base FILE --adapter DIR [--adapter DIR] [--out DIR]")
    typer.echo(summary["markdown"])


def _int_list(text: str, option: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise DigitlensError(f"{option} {text!r}: expected comma-separated integers like 4,8,64") from None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
