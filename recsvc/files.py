"""Writing files others read: the modes the umask asks for, atomic replacement, arrays, errors that name the path.

The trainer often runs as another user or group than the servers (cron vs a service account): what it
writes must be as readable as the umask allows, never private because of a temporary file's 0600/0700.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np


@functools.cache
def umask() -> int:
    """The process's umask, read once: Linux shows it in /proc/self/status; elsewhere it can only be read by
    setting it, which is done once, before any thread of ours writes files."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def shared_file_mode() -> int:
    """The mode open() would give a new file: 0o666 less the umask."""
    return 0o666 & ~umask()


def shared_directory_mode() -> int:
    """The mode mkdir() would give a new directory: 0o777 less the umask."""
    return 0o777 & ~umask()


@contextlib.contextmanager
def naming(path: Path | str) -> Iterator[None]:
    """Add `path` to an OSError that lacks one: a failed write() says "No space left on device" but not where."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None or exc.errno is None:
            raise
        raise OSError(exc.errno, exc.strerror, str(path)) from exc


def write_atomically(path: Path, text: str, mode: int | None = None) -> None:
    """Replace `path` with `text` all at once: a temporary file beside it, fsync, rename over. A full disk or a
    crash leaves the old file whole. `mode`: default the existing file's, else the umask's."""
    with replacing(path, mode) as staging, open(staging, "w", encoding="utf-8") as handle:
        handle.write(text)


@contextlib.contextmanager
def replacing(path: Path, mode: int | None = None) -> Iterator[Path]:
    """A temporary file beside `path` for the caller to write by name (with any writer: Arrow's, gzip's), which
    then replaces `path` all at once: fsync, rename over. A reader never sees half a file; an error while
    writing leaves the old file whole and removes the temporary one. `mode`: default the existing file's, else
    the umask's."""
    path = Path(path)
    if mode is None:
        try:
            mode = path.stat().st_mode & 0o7777
        except FileNotFoundError:
            mode = shared_file_mode()
    fd, staging = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        with naming(path):
            yield Path(staging)
            fd = os.open(staging, os.O_RDONLY)  # Linux flushes a file's data whatever the descriptor's mode
            try:
                os.fsync(fd)
                os.fchmod(fd, mode)
            finally:
                os.close(fd)
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise


def check_writable_directory(path: Path) -> None:
    """Create `path` if needed and create (and remove) a file in it: the real error of the filesystem
    (EACCES, EROFS, ...) naming `path`, now rather than after an hour of work. os.access cannot tell a
    read-only filesystem from a missing permission, and says yes to root."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:  # its filename is the random probe's
        raise OSError(exc.errno, exc.strerror, str(path)) from exc


def check_writable_file(path: Path) -> None:
    """Whether a file can be replaced: its directory takes new files and the file itself, if any, is
    writable (a read-only file says "do not change me", although a rename would)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(path.parent))
    check_writable_directory(path.parent)
    if path.exists():
        with open(path, "ab"):  # opens for writing, changes nothing
            pass


def save_array(path: Path, array: np.ndarray) -> None:
    """np.save's format (no pickle), with the data written through Python's file object: numpy's own writer
    turns a full disk into "422885 requested and 182240 written", losing the reason and the path."""
    array = np.ascontiguousarray(array)
    with naming(path), open(path, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, np.lib.format.header_data_from_array_1_0(array))
        handle.write(array.reshape(-1).view(np.uint8))
