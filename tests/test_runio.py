import json
import os
import stat

import numpy as np
import pytest

from digitlens.errors import DigitlensError
from digitlens.runio import atomic_path, read_json, read_npz, write_json, write_npz


def test_write_json_round_trip_and_mode(tmp_path):
    path = write_json(tmp_path / "a.json", {"x": np.float32(0.5), "y": np.arange(3)})
    assert read_json(path) == {"x": 0.5, "y": [0, 1, 2]}
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    path = write_json(tmp_path / "a.json", {"old": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert json.loads(path.read_text()) == {"old": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_bad_files_give_one_line_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(DigitlensError, match="bad.json: not valid JSON"):
        read_json(bad)
    with pytest.raises(DigitlensError, match="missing.npz: file not found"):
        read_npz(tmp_path / "missing.npz")
    arrays = read_npz(write_npz(tmp_path / "ok.npz", a=np.eye(2)))
    np.testing.assert_array_equal(arrays["a"], np.eye(2))
