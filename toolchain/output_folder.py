"""The output folder: built in a temporary folder beside it, then renamed into place, so a failed or
interrupted run never leaves a half-written output behind.

sqexport deletes only files it wrote itself. Every finished output holds a manifest
(`.sqexport-manifest.json`: each file's path, size and SHA-256); an existing folder is replaced only
when it is empty or holds exactly files its manifest lists, unchanged. Anything else is an
OutputError naming the first foreign file. A temporary folder carries a marker with the owning
process id, so one left by a killed run is removed by a later run, and nothing without it ever is.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from sqexport.contracts.errors import OutputError
from sqexport.contracts.files import sha256_file
from sqexport.toolchain import signals
from sqexport.toolchain.manifest import MANIFEST, read_manifest, write_manifest_entries

__all__ = ["MANIFEST", "TMP_MARKER", "atomic_output", "check_output", "resolve_output",
           "remove_stale_temps", "intact_output"]

TMP_MARKER = ".sqexport-tmp.json"
_read_manifest = read_manifest  # the name code on main (intact_output, for `sweep`) calls
_TMP_TAG = ".tmp-"
_RANDOM_CHARS = 8  # what tempfile.mkdtemp appends
# write errors that mean "the disk (or quota, or file-size limit) is full", whatever raised them
_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_LOW_SPACE = 1 << 20


def _limit(path: Path, name: str, default: int) -> int:
    try:
        return os.pathconf(path, name)
    except (OSError, ValueError):
        return default


def resolve_output(outdir: Path) -> Path:
    """The absolute folder that will be written: symlinks resolved (so `-o LINK` writes where the
    link points and leaves the link alone), names checked against the file system's limits."""
    if "\0" in os.fsdecode(outdir):
        raise OutputError(f"output folder {os.fsdecode(outdir)!r} contains a NUL character")
    try:
        path = Path(os.path.abspath(os.fsdecode(outdir)))
        path = path.resolve() if path.is_symlink() or any(p.is_symlink() for p in path.parents) else path
    except (OSError, RuntimeError, ValueError) as exc:  # loops, NUL bytes, over-long paths
        raise OutputError(f"cannot use output folder {outdir}: {_reason(exc)}") from None
    if not path.name:
        raise OutputError(f"output folder {outdir} is a file system root; choose a folder below it")
    anchor = next((p for p in (path, *path.parents) if p.is_dir()), Path("/"))
    name_max, path_max = _limit(anchor, "PC_NAME_MAX", 255), _limit(anchor, "PC_PATH_MAX", 4096)
    if len(os.fsencode(str(path))) >= path_max:
        raise OutputError(f"output path is {len(os.fsencode(str(path)))} bytes long; "
                          f"this file system allows {path_max - 1}")
    for part in path.parts:
        if len(os.fsencode(part)) > name_max:
            raise OutputError(f"output folder name '{part[:40]}...' is {len(os.fsencode(part))} bytes; "
                              f"this file system allows {name_max}")
    return path


def _reason(exc: BaseException) -> str:
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__



def _walk(folder: Path):
    """(relative path, entry) for everything below `folder`, never following symlinks."""
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        rel = Path(entry.name)
        if entry.is_dir(follow_symlinks=False):
            yield rel, entry
            yield from ((rel / sub, e) for sub, e in _walk(Path(entry.path)))
        else:
            yield rel, entry


def _replaceable(outdir: Path) -> dict[str, dict]:
    """The files of an earlier output to delete (empty if there is none); OutputError when
    `outdir` holds anything sqexport did not write. What is returned comes from walking the folder
    (never following a symlink), each file checked against the manifest: a manifest entry naming
    `../x`, an absolute path or anything not found below the folder is never returned."""
    if outdir.is_symlink() or (outdir.exists() and not outdir.is_dir()):
        raise OutputError(f"output {outdir} exists and is not a folder")
    blocker = next((p for p in outdir.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise OutputError(f"cannot write output folder {outdir}: {blocker} is a file, not a folder")
    if not outdir.is_dir():
        return {}
    entries = list(_walk(outdir))
    if not entries:
        return {}
    if not (outdir / MANIFEST).is_file():
        raise OutputError(f"output folder {outdir} already holds files sqexport did not write "
                          f"('{entries[0][0]}'); choose another -o")
    files = read_manifest(outdir)
    verified = {}
    for rel, entry in entries:
        if str(rel) == MANIFEST or entry.is_dir(follow_symlinks=False):
            continue
        known = files.get(str(rel))
        if known is None or not entry.is_file(follow_symlinks=False):
            raise OutputError(f"output folder {outdir} holds '{rel}', which sqexport did not write; "
                              "choose another -o or move it away")
        if entry.stat(follow_symlinks=False).st_size != known["size"] or sha256_file(Path(entry.path)) != known["sha256"]:
            raise OutputError(f"output folder {outdir}: '{rel}' was changed after sqexport wrote it; "
                              "choose another -o or move it away")
        verified[str(rel)] = known
    return verified


def check_output(outdir: Path) -> Path:
    """Fail early (before any slow work) if `outdir` cannot be written or replaced."""
    path = resolve_output(outdir)
    try:
        _replaceable(path)
    except OSError as exc:
        raise OutputError(f"cannot use output folder {outdir}: {_reason(exc)}") from None
    return path


def intact_output(outdir: Path) -> bool:
    """True if `outdir` is a finished sqexport output holding exactly its manifest's files, unchanged
    (what lets `sqexport sweep` skip a job on a rerun)."""
    try:
        return bool((outdir / MANIFEST).is_file() and _replaceable(outdir).keys() == _read_manifest(outdir).keys())
    except (OutputError, OSError):
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # another user's process, or a pid we cannot test: keep its folder
    return True


def remove_stale_temps(parent: Path) -> list[Path]:
    """Delete temporary folders in `parent` left by sqexport runs that were killed (SIGKILL,
    power loss): only folders holding our marker, made on this host by a process that is gone."""
    removed = []
    try:
        candidates = [e for e in os.scandir(parent) if e.name.startswith(".") and _TMP_TAG in e.name
                      and e.is_dir(follow_symlinks=False)]
    except OSError:
        return removed
    for entry in candidates:
        try:
            marker = json.loads((Path(entry.path) / TMP_MARKER).read_text(encoding="utf-8"))
            pid, host = int(marker["pid"]), str(marker["host"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not provably ours
        if host == os.uname().nodename and pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(Path(entry.path))
    return removed


def _temp_prefix(name: str, name_max: int) -> str:
    """`.NAME.tmp-`, NAME shortened so the temporary name fits the file system's name limit."""
    room = name_max - len(os.fsencode(f"..{_TMP_TAG}")) + 1 - _RANDOM_CHARS
    short = os.fsencode(name)[:max(room, 1)].decode("utf-8", errors="ignore") or "out"
    return f".{short}{_TMP_TAG}"


def _missing_parents(outdir: Path) -> list[Path]:
    """The folders above `outdir` that do not exist yet, top first: created for this run, and
    removed again (if still empty) when the run fails."""
    return [p for p in reversed(outdir.parents) if not os.path.lexists(p)]


def _remove_created(created: list[Path]) -> None:
    for folder in reversed(created):
        try:
            folder.rmdir()
        except OSError:
            return  # something else was put there meanwhile: it stays, and so do its parents


def _make_temp(outdir: Path) -> Path:
    outdir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(outdir.name, _limit(outdir.parent, "PC_NAME_MAX", 255)),
                                dir=outdir.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes 0700; the result is an ordinary folder
    (tmp / TMP_MARKER).write_text(json.dumps({"tool": "sqexport", "pid": os.getpid(),
                                              "host": os.uname().nodename, "output": outdir.name}))
    return tmp


def _write_manifest(tmp: Path) -> None:
    (tmp / TMP_MARKER).unlink(missing_ok=True)
    write_manifest_entries(tmp, {str(rel): {"size": e.stat(follow_symlinks=False).st_size,
                                            "sha256": sha256_file(Path(e.path))}
                                 for rel, e in _walk(tmp) if e.is_file(follow_symlinks=False)})


def _unlink_below(root: Path, rel: str) -> None:
    """Delete root/rel through file descriptors opened with O_NOFOLLOW, so a folder swapped for a
    symlink after the check cannot redirect the delete outside `root`."""
    parts = Path(rel).parts
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
    fds = [os.open(root, flags)]
    try:
        for part in parts[:-1]:
            fds.append(os.open(part, flags, dir_fd=fds[-1]))
        try:
            os.unlink(parts[-1], dir_fd=fds[-1])
        except FileNotFoundError:
            pass
    finally:
        for fd in fds:
            os.close(fd)


def _remove_previous(outdir: Path, files: dict[str, dict]) -> None:
    """Delete exactly the verified files of an earlier output, the manifest last, then the folder."""
    for rel in sorted(files, key=lambda r: -r.count("/")):
        if rel != MANIFEST:
            _unlink_below(outdir, rel)
    for rel, entry in sorted(_walk(outdir), key=lambda item: -len(item[0].parts)):
        if entry.is_dir(follow_symlinks=False):
            os.rmdir(entry.path)  # fails (OSError) if something new appeared in it meanwhile
    (outdir / MANIFEST).unlink(missing_ok=True)
    outdir.rmdir()


def _inside(filename, folder: Path) -> bool:
    try:
        return filename is not None and Path(os.fsdecode(filename)).absolute().is_relative_to(folder)
    except (TypeError, ValueError):
        return False


def _as_output_error(exc: BaseException, outdir: Path, tmp: Path) -> OutputError | None:
    """A write that failed for lack of space, or any OS error on the output's own files, is an
    output problem, whichever layer it surfaced in (torch.onnx, onnx, the report writer) and
    however it was wrapped. With the disk all but full, any failure is taken for that."""
    if isinstance(exc, OutputError):
        return None
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError) and (seen.errno in _FULL or _inside(seen.filename, tmp)
                                          or _inside(seen.filename, outdir)):
            return OutputError(f"cannot write output folder {outdir}: {_reason(seen)}")
        seen = seen.__cause__ or (None if seen.__suppress_context__ else seen.__context__)
    try:
        st = os.statvfs(tmp)
        if st.f_bavail * st.f_frsize < _LOW_SPACE:
            return OutputError(f"cannot write output folder {outdir}: no space left on device")
    except OSError:
        pass
    return None


@contextmanager
def atomic_output(outdir: Path, log: Callable[[str], None] | None = None):
    """Yield a temporary folder beside `outdir`; on success it replaces `outdir` (only an empty
    folder or an earlier sqexport output, see the module docstring); on error or a signal it
    vanishes and `outdir` is left as it was."""
    outdir = check_output(outdir)
    created = _missing_parents(outdir)
    try:
        for stale in remove_stale_temps(outdir.parent) if outdir.parent.is_dir() else []:
            if log:
                log(f"removed {stale.name}, left by an sqexport run that was killed")
        with signals.deferred():  # a signal between mkdtemp and the `try` would orphan the folder
            tmp = _make_temp(outdir)
    except (OSError, ValueError) as exc:
        _remove_created(created)
        raise OutputError(f"cannot write output folder {outdir}: {_reason(exc)}") from None
    try:
        yield tmp
        signals.check()
        _write_manifest(tmp)
        with signals.deferred():
            previous = _replaceable(outdir)
            if outdir.is_dir():
                _remove_previous(outdir, previous)
            tmp.rename(outdir)
        signals.check()
    except BaseException as exc:
        error = _as_output_error(exc, outdir, tmp) if isinstance(exc, Exception) else None
        with signals.deferred():
            shutil.rmtree(tmp, ignore_errors=True)
            _remove_created(created)
        if error is not None:
            raise error from None
        raise
