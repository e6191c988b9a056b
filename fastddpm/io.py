"""Atomic file writes: a reader sees the old file or the whole new one, never a torn one."""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call write(tmp_path) on a temporary file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_tmp_prefix(path), suffix=TMP_SUFFIX)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the mode open() would
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


TMP_SUFFIX = ".tmp"
_TMP_RANDOM = 8  # the characters tempfile.mkstemp puts between prefix and suffix


def _tmp_prefix(path: Path) -> str:
    return f".{path.name}."


def check_output(path: str | os.PathLike, option: str) -> Path:
    """Raise a one-line ValueError, naming `option`, unless atomic_write(path) can work: `path` is
    not a directory, its nearest existing ancestor is a writable directory, and every name to be
    made there, the temporary file's included, fits the file system's name limit. Writes nothing
    but a probe file, removed at once. Call it before the work whose result goes to `path`."""
    if str(path) == "":
        raise ValueError(f"{option} is empty: name the file to write")
    path = Path(path)
    parent = path.parent
    while not os.path.exists(parent) and parent != parent.parent:  # os.path: False for a too-long name
        parent = parent.parent
    name_max = os.pathconf(parent, "PC_NAME_MAX") if os.path.isdir(parent) else 255
    names = [*path.relative_to(parent).parts[:-1], _tmp_prefix(path) + "x" * _TMP_RANDOM + TMP_SUFFIX]
    for name in names:
        if len(name.encode()) > name_max:
            raise ValueError(
                f"{option} {path}: the name {name[:40]}... is longer than the {name_max} bytes"
                f" the file system allows (the temporary file adds {_TMP_RANDOM + 6} to the file's name)"
            )
    if os.path.isdir(path):
        raise ValueError(f"{option} {path} is a directory, not a file")
    if not os.path.isdir(parent):
        raise ValueError(f"{option} {path}: {parent} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".fastddpm-probe.", suffix=TMP_SUFFIX)
    except OSError as err:
        reason = "it is read-only" if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM) else err.strerror
        raise ValueError(f"{option} {path}: cannot write in {parent}: {reason}") from None
    os.close(fd)
    os.unlink(probe)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
