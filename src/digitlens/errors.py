"""The one exception type digitlens raises for bad input.

Its message is a single line naming the file or argument and what was wrong; the CLI prints
it as ``error: <message>`` and exits with status 2 instead of showing a traceback.
"""


class DigitlensError(Exception):
    """Bad input: a missing or corrupt file, an unknown name, a shape that does not fit."""
