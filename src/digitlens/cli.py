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


# Commands are added below, one function per command, each calling one API function.


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
