"""Files from the user's disk: digests, and the one rule every path option follows.

Regular files only. A FIFO, a socket or a device given where a file is read would block the run
forever (a FIFO with no writer) or stream without end (/dev/zero), so every path sqexport reads
is checked here first (`require_regular`), and reads that must not follow a swapped-in special
file open with O_NONBLOCK and check the opened descriptor (`read_regular_bytes`).
"""
from __future__ import annotations

import errno
import hashlib
import os
import re
import stat
from pathlib import Path

from sqexport.contracts.errors import ConfigError, SqexportError

__all__ = ["sha256_file", "require_regular", "read_regular_bytes", "copy_regular", "file_kind", "plain_name",
           "is_sha256", "first_special_file"]

_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder"))
_SHA256 = re.compile(r"[0-9a-f]{64}")
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._+-]+")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a regular file, read in 1 MiB blocks (models can be hundreds of MB)."""
    digest = hashlib.sha256()
    with open(_open_regular(Path(path), "file", ConfigError), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_sha256(value) -> bool:
    return isinstance(value, str) and bool(_SHA256.fullmatch(value))


def file_kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def require_regular(path: Path, what: str, error: type[SqexportError] = ConfigError, dir_ok: bool = False,
                    must_exist: bool = True) -> Path:
    """`path` if it is a regular file (or, with `dir_ok`, a folder); otherwise `error` naming
    `what` and the kind of file. Symlinks are followed: a link to a regular file is fine."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if must_exist:
            raise error(f"{what} {path}: no such file") from None
        return path
    except OSError as exc:
        raise error(f"{what} {path}: {exc.strerror or type(exc).__name__}") from None
    if stat.S_ISREG(mode) or (dir_ok and stat.S_ISDIR(mode)):
        return path
    raise error(f"{what} {path} is {file_kind(mode)}; sqexport reads regular files only")


def _open_regular(path: Path, what: str, error: type[SqexportError], follow: bool = True) -> int:
    """An fd of `path` opened without blocking (a FIFO would wait for a writer), checked to be a
    regular file after opening, so a file swapped for a FIFO after a stat() is caught too."""
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow:
            raise error(f"{what} {path} is a symlink; sqexport reads only regular files there") from None
        raise error(f"cannot read {what} {path}: {exc.strerror or type(exc).__name__}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise error(f"{what} {path} is {file_kind(mode)}; sqexport reads regular files only")
    os.set_blocking(fd, True)
    return fd


def read_regular_bytes(path: Path, what: str, error: type[SqexportError] = ConfigError,
                       limit: int | None = None, follow: bool = True) -> bytes:
    """The bytes of a regular file (never blocks on a FIFO); `limit`: more is an error, found
    before reading it all; `follow=False`: a symlink is an error."""
    fd = _open_regular(Path(path), what, error, follow)
    with os.fdopen(fd, "rb") as f:
        data = f.read() if limit is None else f.read(limit + 1)
    if limit is not None and len(data) > limit:
        raise error(f"{what} {path} is larger than {limit:,} bytes")
    return data


def copy_regular(src: Path, dst: Path, what: str, error: type[SqexportError] = ConfigError,
                 follow: bool = False) -> None:
    """Copy a regular file; `follow=False` (the default): a symlink is an error, never followed
    (a `tokenizer.json` linking to /etc/hostname must not end up in a bundle)."""
    fd = _open_regular(Path(src), what, error, follow)
    with os.fdopen(fd, "rb") as f, open(dst, "wb") as out:
        for block in iter(lambda: f.read(1 << 20), b""):
            out.write(block)


def first_special_file(folder: Path) -> str | None:
    """Describes the first entry of `folder` (not recursive) that is neither a regular file nor a
    folder, symlinks followed: a library that reads the folder (transformers) would block on a FIFO."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return None
    for entry in entries:
        try:
            mode = os.stat(entry.path).st_mode
        except OSError:
            continue  # a dangling link: nothing to block on
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            return f"{entry.path} is {file_kind(mode)}"
    return None


def plain_name(text, fallback: str = "model", max_len: int = 100) -> str:
    """A file-name-safe version of `text` (from a report, a manifest, a model reference): letters,
    digits and ._+- only, no leading dot, never a path; `fallback` when nothing is left."""
    name = _UNSAFE_NAME.sub("_", str(text) if isinstance(text, str) else "").strip("._")[:max_len]
    return name or fallback
