"""digitlens: train handwritten-digit recognisers and see what they learned and where they fail.

The package is laid out in layers, lowest first. A module imports only modules of its own or a
lower layer, never a higher one, at module level (no import cycles; an optional heavy third-party
library may be imported inside a function, with a comment saying why). ``tests/test_layers.py``
checks this table against the code.

0 floor: errors runio figure_writer pyplot device progress groups metrics history intervals calibration explain explain.maps subspace subspace.measures
    pure computation and file I/O, no stage logic (the explain and subspace packages import nothing themselves)
1 data: dataset_types preprocess userdata data
    datasets by name and a user's images and CSV files, as tensors
2 models: models external inference
    the architectures, a user's model files, the one predict function
3 plots: plots
    figures (Display classes); they import only the floor
4 stages: train distributed seeds evaluate insights predict comparison explain.run explain.methods explain.aggregate explain.faithfulness explain.road explain.verdict explain.scoring explain.figures adapt subspace.run subspace.adapters
    each writes its files into a run folder
5 report: report
    reads the stages' JSON files and figures.json manifests only
6 apps: demo serve cli __main__
    the command line (parses and calls the API), the web page, the demo
"""

from digitlens.errors import DigitlensError

__version__ = "0.1.0"

__all__ = ["DigitlensError", "__version__"]
