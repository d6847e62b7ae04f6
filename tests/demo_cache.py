"""One fast demo per test session, shared by test_demo.py and test_browser.py.

``fast_demo(tmp_path_factory)`` runs ``run_demo(fast=True)`` once into the session's temporary
folder and returns its ``demo.json`` dict; later calls in the same session reuse it.
"""

from __future__ import annotations

import json

import torch


def fast_demo(tmp_path_factory) -> dict:
    from digitlens.demo import run_demo

    root = tmp_path_factory.getbasetemp() / "fast-demo"
    marker = root / "demo-digits" / "demo.json"
    if marker.is_file():
        result = json.loads(marker.read_text())
        if result.get("steps"):
            return result
    # One thread: on a machine shared with other jobs, two threads per process make small
    # conv batches many times slower (threads wait on each other), and the results do not change.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_demo(root, fast=True, progress=False)
    finally:
        torch.set_num_threads(threads)
