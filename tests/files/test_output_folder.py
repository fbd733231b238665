"""files/output_folder.py: the rule for a folder a command writes, on a made-up command (the real
commands' tests are in tests/cli/test_combine.py, tests/cli/test_cli_errors.py and
tests/training/test_run_folder.py)."""

from __future__ import annotations

import json
import os

import pytest

from lorakit.files.output_folder import Output


class Refused(Exception):
    pass


MAKE = Output(
    command="make-thing", what="a thing folder", marker="thing.json", names=("thing.json", "thing.bin"), error=Refused
)


def fill(folder, data=b"new"):
    (folder / "thing.bin").write_bytes(data)
    (folder / "extra.txt").write_text("listed in thing.json")


def names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_a_new_folder_appears_whole_or_not_at_all(tmp_path):
    def broken(folder):
        (folder / "thing.bin").write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        MAKE.write(tmp_path / "out", broken, {}, overwrite=False)
    assert list(tmp_path.iterdir()) == []  # no target, no leftovers
    MAKE.write(tmp_path / "out", fill, {"why": "test"}, overwrite=False)
    assert names(tmp_path) == ["out"]
    assert json.loads((tmp_path / "out" / "thing.json").read_text()) == {
        "why": "test",
        "files": ["extra.txt", "thing.bin", "thing.json"],
    }
    with pytest.raises(OSError, match="disk full"):
        MAKE.write(tmp_path / "out", broken, {}, overwrite=True)
    assert names(tmp_path) == ["out"] and (tmp_path / "out" / "thing.bin").read_bytes() == b"new"


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_the_command_did_not_write_is_refused(overwrite, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thing.bin").write_text("my own file, with the command's name")
    with pytest.raises(Refused, match=r"holds files that are not a thing folder \(no thing.json\)"):
        MAKE.check_out(mine, overwrite)
    with pytest.raises(Refused, match="not a thing folder"):  # checked again when writing
        MAKE.write(mine, fill, {}, overwrite)
    assert names(mine) == ["thing.bin"] and names(tmp_path) == ["mine"]


def test_an_empty_folder_is_new_and_a_previous_output_needs_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    MAKE.check_out(out, overwrite=False)
    MAKE.write(out, fill, {}, overwrite=False)
    with pytest.raises(Refused, match="already exists and is not empty; pass --overwrite to replace a thing folder"):
        MAKE.check_out(out, overwrite=False)
    MAKE.check_out(out, overwrite=True)


def test_overwrite_removes_only_what_the_command_wrote(tmp_path, monkeypatch):
    out = tmp_path / "out"
    MAKE.write(out, fill, {}, overwrite=False)
    (out / "notes.txt").write_text("mine")
    (out / ".thing.bin.ab12.tmp").write_text("left by a killed write")
    MAKE.write(out, lambda f: (f / "thing.bin").write_bytes(b"newer"), {}, overwrite=True)
    assert names(out) == ["notes.txt", "thing.bin", "thing.json"]  # extra.txt went with the old output
    assert (out / "thing.bin").read_bytes() == b"newer"
    assert names(tmp_path) == ["out"]  # the old output was set aside, then removed


def test_out_dot_keeps_the_folder_it_is_run_from(tmp_path, monkeypatch):
    out = tmp_path / "out"
    MAKE.write(out, fill, {}, overwrite=False)
    inode = out.stat().st_ino
    monkeypatch.chdir(out)  # only the previous output there, but the folder is the working one: not swapped
    MAKE.write(out, lambda f: (f / "thing.bin").write_bytes(b"newer"), {}, overwrite=True)
    assert out.stat().st_ino == inode and names(out) == ["thing.bin", "thing.json"]


def test_a_marker_naming_other_places_removes_nothing_outside(tmp_path):
    out = tmp_path / "out"
    MAKE.write(out, fill, {}, overwrite=False)
    (tmp_path / "precious").write_text("outside")
    (out / "sub").mkdir()
    (out / "sub" / "x").write_text("mine")
    record = {"files": ["../precious", "sub/x", "..", ".", "", 7, "extra.txt"]}
    (out / "thing.json").write_text(json.dumps(record))
    assert [p.name for p in MAKE.entries(out)] == ["extra.txt", "thing.bin", "thing.json"]
    MAKE.remove_previous(out)
    assert (tmp_path / "precious").read_text() == "outside" and (out / "sub" / "x").read_text() == "mine"
    (out / "extra.txt").write_text("now the user's: no readable list names it")
    for broken in ("{broken", "[1, 2]", '{"files": "extra.txt"}'):  # only the fixed names count
        (out / "thing.json").write_text(broken)
        assert [p.name for p in MAKE.entries(out)] == ["thing.json"]


def test_a_file_of_the_users_with_a_name_the_command_writes_is_refused(tmp_path):
    out = tmp_path / "out"
    MAKE.write(out, lambda f: (f / "thing.bin").write_bytes(b"old"), {}, overwrite=False)
    (out / "extra.txt").write_text("mine, not in thing.json")
    with pytest.raises(Refused, match="holds extra.txt, which make-thing writes but is not from its previous"):
        MAKE.write(out, fill, {}, overwrite=True)
    assert (out / "extra.txt").read_text() == "mine, not in thing.json" and (out / "thing.bin").read_bytes() == b"old"
    assert names(tmp_path) == ["out"]


@pytest.mark.parametrize(("where", "relation"), [("input", "is"), ("input/sub", "is inside"), (".", "holds")])
def test_an_input_is_never_the_folder_inside_it_or_holding_it(where, relation, tmp_path):
    source = tmp_path / "input"
    source.mkdir()
    out = tmp_path / where
    with pytest.raises(Refused, match=f"--out {out} {relation} --data {source}; make-thing never writes where"):
        MAKE.check_out(out, overwrite=True, inputs=[("--data", source)])
    MAKE.check_out(
        tmp_path / "other",
        overwrite=True,
        inputs=[("--data", source), ("--model", "org/hub-id"), ("--eval-data", None)],
    )
    assert os.listdir(tmp_path) == ["input"]
