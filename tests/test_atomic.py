"""atomic.py: files and folders appear whole or not at all."""

from __future__ import annotations

import pytest


def test_folder_written_atomically_or_not_at_all(tmp_path):
    from lorakit.atomic import write_folder_atomic

    def broken(folder):
        (folder / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_folder_atomic(tmp_path / "merged", broken, overwrite=False)
    assert list(tmp_path.iterdir()) == []  # no target, no leftovers
    write_folder_atomic(tmp_path / "merged", lambda f: (f / "a.json").write_text("{}"), overwrite=False)
    with pytest.raises(OSError, match="disk full"):
        write_folder_atomic(tmp_path / "merged", broken, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]
    assert [p.name for p in (tmp_path / "merged").iterdir()] == ["a.json"]  # the old folder, untouched
