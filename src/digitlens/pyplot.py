"""The one way digitlens imports ``matplotlib.pyplot``: :func:`pyplot`."""

from __future__ import annotations

import os


def pyplot():
    """``matplotlib.pyplot``, on the non-interactive Agg backend unless one was chosen: ``$MPLBACKEND``
    or a backend already in use (e.g. a notebook's inline backend) is respected, never overridden."""
    import matplotlib  # lazily: importing digitlens must not load matplotlib (serve and train never draw)

    if "MPLBACKEND" not in os.environ and matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
