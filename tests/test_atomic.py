"""Atomic writes: a failure leaves nothing under the final name."""

from __future__ import annotations

import json

import pytest

from bmdpipe.io.atomic import atomic_dir, atomic_path, write_json


def test_atomic_path_keeps_the_extension_and_renames(tmp_path):
    with atomic_path(tmp_path / "a.nii.gz") as tmp:
        assert tmp.name.endswith(".nii.gz") and tmp.parent == tmp_path
        tmp.write_bytes(b"x")
    assert (tmp_path / "a.nii.gz").read_bytes() == b"x"
    assert [p.name for p in tmp_path.iterdir()] == ["a.nii.gz"]


def test_failure_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "a.json") as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "f").write_text("half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_replaces_an_existing_folder(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "old").write_text("old")
    with atomic_dir(tmp_path / "d") as tmp:
        (tmp / "new").write_text("new")
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["new"]


def test_atomic_dir_removes_what_a_killed_attempt_left(tmp_path):
    (tmp_path / ".d.tmp-abc123").mkdir()  # a killed job's half-written folder
    (tmp_path / ".d.tmp-abc123" / "half").write_text("half")
    (tmp_path / ".d2.tmp-xyz").mkdir()  # another output's: kept
    with atomic_dir(tmp_path / "d") as tmp:
        (tmp / "new").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".d2.tmp-xyz", "d"]


def test_write_json_handles_numpy(tmp_path):
    import numpy as np

    write_json(tmp_path / "s.json", {"a": np.float32(1.5), "b": np.arange(3)})
    assert json.loads((tmp_path / "s.json").read_text()) == {"a": 1.5, "b": [0, 1, 2]}
