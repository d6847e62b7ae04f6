"""digitlens: train handwritten-digit recognisers and see what they learned and where they fail.

The package is laid out as the data flows:
data -> models -> train -> evaluate -> explain -> adapt / subspace -> plots -> report,
with a thin ``cli`` on top that only parses arguments and calls these modules.
"""

from digitlens.errors import DigitlensError

__version__ = "0.1.0"

__all__ = ["DigitlensError", "__version__"]
