"""The ``digitlens`` command line: parses arguments and calls the Python API, nothing more.

Every command turns a :class:`DigitlensError` into one line ``error: ...`` on stderr and exit
status 2, never a traceback.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Optional

import typer

from digitlens.errors import DigitlensError

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

    return wrapper


@app.callback()
def main() -> None:
    """Train handwritten-digit recognisers and see what they learned and where they fail."""
    # A callback keeps `digitlens COMMAND` a command group even while only one command exists.


# Commands are added below, one function per command, each calling one API function.


@app.command("evaluate")
@one_line_errors
def evaluate_command(
    run_dir: Optional[Path] = typer.Argument(None, help="Run folder from `digitlens train` (omit with --model-file --dataset --out)."),
    model_file: Optional[Path] = typer.Option(None, "--model-file", help="A TorchScript model file to evaluate instead of the run's model."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Folder with the MNIST IDX files."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Without a run folder: dataset whose test split to use (mnist, digits)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Without a run folder: where to write predictions, metrics, insights and figures."),
    history: Optional[Path] = typer.Option(None, "--history", help="Without a run folder: training history (Keras CSVLogger .csv or history.history .json)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Predict the test split; write predictions.npz, metrics.json, insights.md/json and figures/."""
    from digitlens import evaluate

    if run_dir is not None:
        if dataset is not None or out is not None or history is not None:
            raise DigitlensError("--dataset/--out/--history: only used without a run folder (the run folder has them)")
        summary = evaluate.evaluate_run(run_dir, model=model_file, data_dir=data_dir, progress=progress)
    else:
        if model_file is None or dataset is None or out is None:
            raise DigitlensError("evaluate: give a run folder, or --model-file, --dataset and --out together")
        summary = evaluate.evaluate_model(model_file, dataset, out_dir=out, data_dir=data_dir, history=history,
                                          progress=progress)
    typer.echo(f"accuracy {summary['accuracy']:.4f}  errors {summary['n_errors']}/{summary['n_samples']}  "
               f"macro F1 {summary['macro_f1']:.4f}  ECE {summary['ece']:.4f}")
    for sentence in summary["insights"][1:]:
        typer.echo(f"- {sentence}")
    typer.echo(f"wrote {summary['out_dir']}/metrics.json, insights.md and {len(summary['figures'])} figure files")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
