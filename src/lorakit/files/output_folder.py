"""The folder a command writes (`--out`): one rule for every lorakit command that writes one
(train, merge, combine, and any new one).

A command describes what it writes with an `Output`: the file that marks a folder as its output
(`marker`: train's run_config.json, merge's merge.json, combine's combine.json), the entries it
writes, and the error its checks raise. Before anything is written (`Output.check_out`):

- `--out` is a folder or can be made one: no file in the way along its path, in a place that
  can be written;
- no input of the command (a data file, the model folder, an adapter folder) is `--out`, lies
  inside it or holds it, so nothing the command reads is ever in what it replaces;
- `--out` is new or empty, or it holds this command's previous output (it has the marker) and
  `--overwrite` was given. Any other folder is refused, with `--overwrite` or without.

`--overwrite` removes only what the command writes: its entries (the fixed names, and those the
marker lists under "files") and the temporary files an interrupted atomic write leaves. Files
of the user's in the folder stay. `Output.write` builds the new output aside and renames it into
place whole when it can (a new folder, or one holding only the previous output); beside the
user's files each entry is renamed in on its own, the marker last.

Standard library only: the core, the training wing and the CLI all use it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .atomic import make_temp_dir, write_json_atomic

# (what the input is, its path) for each input of a command: ("--data", "train.csv"),
# ("the adapter folder", "runs/a"). A path that is None or does not exist (a hub id) is skipped.
Inputs = Iterable[tuple[str, "str | os.PathLike[str] | None"]]


@dataclass(frozen=True)
class Output:
    """What one command writes in its output folder and how it knows its previous output."""

    command: str  # "lorakit merge", for messages
    what: str  # "a merged model folder": what the marker says a folder is
    marker: str  # the file every output of the command holds
    names: tuple[str, ...]  # entries the command writes in every folder (the marker included)
    error: type[Exception]  # what the checks raise: a user error of the command
    ignore: tuple[str, ...] = ()  # entries that do not make a folder non-empty (train's lock file)
    hint: str = ""  # more to say when --overwrite is missing; "{out}" is replaced by the folder

    # -- the checks, before anything is written ------------------------------------------------
    def check_out(self, out: Path, overwrite: bool, inputs: Inputs = ()) -> None:
        """Every check on a new output's `out`."""
        self.check_destination(out)
        self.check_inputs(out, inputs)
        self.check_contents(out, overwrite)

    def check_destination(self, out: Path, option: str = "--out") -> None:
        """`out` is a folder or can be made one: the nearest part of its path that exists is a
        writable folder (checked without writing anything)."""
        out = Path(out)
        if out.is_symlink() and not out.exists():
            raise self.error(f"{option} {out} is a symbolic link to {os.readlink(out)}, which does not exist")
        if out.exists() and not out.is_dir():
            raise self.error(f"{option} {out} is a file, not a folder")
        nearest = next((p for p in [out, *out.parents] if p.exists() or p.is_symlink()), Path("."))
        if not nearest.is_dir():
            raise self.error(f"{option} {out}: {nearest} is a file, not a folder")
        if not os.access(nearest, os.W_OK | os.X_OK):
            raise self.error(f"{option} {out}: {nearest} is not writable")

    def check_inputs(self, out: Path, inputs: Inputs) -> None:
        """No input is `out`, lies inside it or holds it."""
        where = Path(out).resolve()
        for label, path in inputs:
            if path is None or not Path(path).exists():
                continue
            source = Path(path).resolve()
            if source == where or where in source.parents or source in where.parents:
                relation = "is" if source == where else "holds" if where in source.parents else "is inside"
                raise self.error(
                    f"--out {out} {relation} {label} {path}; {self.command} never writes where it "
                    "reads: choose another --out"
                )

    def check_contents(self, out: Path, overwrite: bool) -> None:
        """`out` is new or empty, or holds this command's previous output and `overwrite` is set."""
        out = Path(out)
        if not out.is_dir():
            return
        try:
            present = [p for p in out.iterdir() if p.name not in self.ignore]
        except OSError as err:
            raise self.error(f"--out {out}: cannot be read ({err.strerror or err})") from None
        if not present:
            return
        if not (out / self.marker).is_file():
            raise self.error(
                f"--out {out} holds files that are not {self.what} (no {self.marker}); {self.command} "
                "does not replace them, even with --overwrite: choose a new or empty folder"
            )
        if not overwrite:
            raise self.error(
                f"--out {out} already exists and is not empty; pass --overwrite to replace "
                f"{self.what} there{self.hint.format(out=out)}"
            )

    # -- what the command wrote, and removing it -----------------------------------------------
    def entries(self, folder: Path) -> list[Path]:
        """What this command wrote in `folder`: its names, the names its marker lists, and the
        temporary files an interrupted atomic write leaves (`.NAME.XXXX.tmp`, see atomic.py)."""
        folder = Path(folder)
        if not folder.is_dir():
            return []
        names = {*self.names, *self._listed(folder)}
        return sorted(p for p in folder.iterdir() if p.name in names or _temporary_of(p.name, names))

    def _listed(self, folder: Path) -> list[str]:
        """The plain file names the marker lists under "files" (none if it lists none or cannot be
        read: then only the fixed names count as the command's, which removes less, never more)."""
        with contextlib.suppress(OSError, ValueError):
            record = json.loads((folder / self.marker).read_text(encoding="utf-8"))
            files = record.get("files") if isinstance(record, dict) else None
            if isinstance(files, list):
                return [f for f in files if isinstance(f, str) and f not in ("", ".", "..") and Path(f).name == f]
        return []

    def remove_previous(self, folder: Path, keep: tuple[str, ...] = ()) -> None:
        """`--overwrite`: remove the entries of the previous output (not those in `keep`)."""
        for entry in self.entries(folder):
            if entry.name not in keep:
                _remove(entry)

    # -- writing a whole output folder ---------------------------------------------------------
    def write(self, target: Path, fill: Callable[[Path], None], record: dict[str, Any], overwrite: bool) -> None:
        """Build the output aside with fill(folder) plus the marker (`record` as JSON, with the
        names written under "files"), then put it at `target` (replacing a previous output if
        `overwrite`). `fill` must not write the marker."""
        target = Path(os.path.abspath(target))
        target.parent.mkdir(parents=True, exist_ok=True)
        built = make_temp_dir(target.parent, target.name)
        try:
            fill(built)
            files = sorted({p.name for p in built.iterdir()} | {self.marker})
            write_json_atomic(built / self.marker, {**record, "files": files})
            self._put(built, target, overwrite)
        finally:
            shutil.rmtree(built, ignore_errors=True)

    def _put(self, built: Path, target: Path, overwrite: bool) -> None:
        self.check_contents(target, overwrite)  # again: the folder may have changed since the first check
        if not target.exists():
            os.rename(built, target)
            return
        previous = self.entries(target)
        theirs = [p for p in target.iterdir() if p not in previous and p.name not in self.ignore]
        clash = sorted({p.name for p in theirs} & {p.name for p in built.iterdir()})
        if clash:
            raise self.error(
                f"--out {target} holds {clash[0]}, which {self.command} writes but is not from its "
                "previous output there; move it, or choose another --out"
            )
        # The previous output goes aside first; it is deleted only once the new one is in place
        # (a failure or Ctrl-C half-way leaves it in the hidden `.NAME.old.XXXX` beside).
        old = make_temp_dir(target.parent, target.name + ".old")
        if not theirs and Path.cwd() != target and target not in Path.cwd().parents:
            os.rename(target, old / target.name)  # only the previous output there: swap the folder whole
            try:
                os.rename(built, target)
            except BaseException:
                os.rename(old / target.name, target)
                raise
        else:  # the user's files stay: entry by entry, the marker last
            for entry in previous:
                if entry.name != self.marker:
                    os.rename(entry, old / entry.name)
            for entry in sorted(built.iterdir()):
                if entry.name != self.marker:
                    os.rename(entry, target / entry.name)
            os.replace(built / self.marker, target / self.marker)
        shutil.rmtree(old, ignore_errors=True)


def _temporary_of(name: str, names: set[str]) -> bool:
    return name.endswith(".tmp") and any(name.startswith(f".{n}.") for n in names)


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry)
    else:
        entry.unlink()
