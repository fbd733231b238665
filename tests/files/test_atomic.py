"""Atomic writes (lorakit/files/atomic.py): the old file or the new one, never half, no temporary left."""

from __future__ import annotations

import json
import os
import stat

import pytest

from lorakit.files.atomic import make_temp_dir, write_atomic, write_bytes_atomic, write_json_atomic


def test_a_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "adapter_config.json"
    target.write_text("old")

    def half_then_fail(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write("ne")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, half_then_fail)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json"]


def test_a_write_replaces_the_file_with_ordinary_modes_and_makes_its_folder(tmp_path):
    target = tmp_path / "deep" / "er" / "weights.bin"
    write_bytes_atomic(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask  # not mkstemp's 0600
    write_json_atomic(target, {"b": 1, "a": [1.5]})
    assert json.loads(target.read_text()) == {"a": [1.5], "b": 1}
    assert target.read_text().endswith("\n") and target.read_text().index('"a"') < target.read_text().index('"b"')
    assert sorted(p.name for p in target.parent.iterdir()) == ["weights.bin"]


def test_a_temp_dir_is_hidden_beside_the_target(tmp_path):
    folder = make_temp_dir(tmp_path, "run")
    assert folder.parent == tmp_path and folder.name.startswith(".run.") and folder.is_dir()
