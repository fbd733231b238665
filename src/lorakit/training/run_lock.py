"""One run writes to a run folder at a time.

`lorakit train` (a new run or `--resume`) holds an exclusive `fcntl.flock` on `OUT/.lorakit.lock`
while it writes there; a second run on the same folder stops at once, naming the first one's
process. The operating system drops the lock when the holder exits, however it exits (kill -9
included), so a lock is never left stale; the file itself stays, holding the last holder's pid.
The lock is taken after every check has passed: a run that is refused creates nothing. Under
DistributedDataParallel only rank 0, the writer, takes it. Where there is no `fcntl` (Windows)
runs are not locked.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from .errors import TrainingError

try:
    import fcntl
except ImportError:  # not on Windows: no locking there
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".lorakit.lock"


class RunLock:
    """The exclusive lock on one run folder; `acquire` creates the folder if it does not exist."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._fd: int | None = None
        self._created: list[Path] = []  # folders acquire made, removed again if the run never starts
        self._made_file = False

    def acquire(self) -> None:
        missing = [p for p in [self.folder, *self.folder.parents] if not p.exists()]
        self._created = missing
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._fd, self._made_file = _open_lock_file(self.folder / LOCK_FILE)
        except OSError as err:
            self._undo()
            raise TrainingError(
                f"{self.folder}: cannot create or write the run folder ({err.strerror or err})"
            ) from None
        if fcntl is None:
            return
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            self._fd = None
            raise TrainingError(in_use(self.folder, holder_pid(self.folder))) from None
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"{os.getpid()}\n".encode())

    def release(self, abandon: bool = False) -> None:
        """Let go of the lock; `abandon`: the run never started, so remove what acquire created."""
        if self._fd is None:
            return
        if abandon:
            self._undo()
        os.close(self._fd)  # closing the last descriptor releases the flock
        self._fd = None

    def _undo(self) -> None:
        if self._made_file:
            with contextlib.suppress(OSError):
                (self.folder / LOCK_FILE).unlink()
        for folder in self._created:  # innermost first; rmdir leaves one that someone else wrote into
            with contextlib.suppress(OSError):
                folder.rmdir()


def _open_lock_file(file: Path) -> tuple[int, bool]:
    """(descriptor, whether this call created the file)."""
    try:
        return os.open(file, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666), True
    except FileExistsError:
        return os.open(file, os.O_RDWR), False


def holder_pid(folder: Path) -> int | None:
    """The pid written by the process holding `folder`'s lock (None when unknown)."""
    with contextlib.suppress(OSError, ValueError):
        return int((Path(folder) / LOCK_FILE).read_text().strip())
    return None


def check_unlocked(folder: Path) -> None:
    """Refuse a folder another run holds, without creating anything (the probe takes and drops a
    shared lock on an existing lock file)."""
    file = Path(folder) / LOCK_FILE
    if fcntl is None or not file.is_file():
        return
    try:
        fd = os.open(file, os.O_RDONLY)
    except OSError:
        return  # unreadable: taking the lock will say so
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise TrainingError(in_use(folder, holder_pid(folder))) from None
    finally:
        os.close(fd)


def in_use(folder: Path, pid: int | None) -> str:
    who = f"process {pid}" if pid else "another process"
    return (
        f"{folder} is in use by another lorakit run ({who} holds {Path(folder) / LOCK_FILE}); "
        "wait for it to end, or write to another folder"
    )
