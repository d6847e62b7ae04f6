"""``pytest --device cuda`` runs the suite's device-independent parts on a GPU: it sets
``DIGITLENS_DEVICE``, which every stage's ``device=None`` (= 'auto') reads. Without the option
'auto' applies (CUDA when available, else the CPU)."""

import os


def pytest_addoption(parser):
    parser.addoption("--device", default=None, help="cpu, cuda, cuda:N or mps: where digitlens' stages compute")


def pytest_configure(config):
    device = config.getoption("--device")
    if device:
        os.environ["DIGITLENS_DEVICE"] = device
