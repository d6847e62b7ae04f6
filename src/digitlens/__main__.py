"""``python -m digitlens``: the command line (also what ``torchrun -m digitlens`` runs)."""

from digitlens.cli import app

if __name__ == "__main__":
    app(prog_name="digitlens")
