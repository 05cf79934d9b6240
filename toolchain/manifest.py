"""`.sqexport-manifest.json`: the list of files sqexport wrote into a folder (path, size, sha256).

The manifest is data from disk, so it proves nothing by itself: a file counts as sqexport's own
(`owned`) only when it is a plain regular file inside the folder (no symlink on the way, no `..`,
no absolute path), listed in the manifest, with the listed size and sha256. Only such files are
ever replaced or deleted; every later write into the folder (`package`, `bench`) records itself
here (`record`), so the next run can still prove the folder is sqexport's.
"""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path, PurePosixPath

from sqexport.contracts.errors import OutputError
from sqexport.contracts.files import is_sha256, sha256_file

__all__ = ["MANIFEST", "MAX_MANIFEST_BYTES", "safe_relative", "read_manifest", "manifest_exists", "owned",
           "record", "write_manifest_entries", "sibling_output"]

MANIFEST = ".sqexport-manifest.json"
MAX_MANIFEST_BYTES = 16 << 20  # thousands of entries; more is not a manifest sqexport wrote


def safe_relative(rel) -> bool:
    """A normalized relative path of plain names: no absolute path, `.`/`..`, empty part or
    control character, so it can only name something below the folder."""
    if not isinstance(rel, str) or not rel or any(ord(c) < 32 or c == "\x7f" for c in rel):
        return False
    pure = PurePosixPath(rel)
    return (bool(pure.parts) and not pure.is_absolute() and str(pure) == rel
            and all(part not in ("", ".", "..") for part in pure.parts))


def manifest_exists(folder: Path) -> bool:
    return os.path.lexists(Path(folder) / MANIFEST)


def read_manifest(folder: Path) -> dict[str, dict]:
    """{relative path: {"size", "sha256"}}; OutputError when the manifest is not one sqexport wrote
    (not JSON, wrong types, unsafe paths, a symlink or not a regular file)."""
    folder = Path(folder)
    path = folder / MANIFEST
    why = None
    try:
        mode = os.lstat(path).st_mode
        if not stat.S_ISREG(mode):
            why = "is not a regular file"
        elif os.lstat(path).st_size > MAX_MANIFEST_BYTES:
            why = "is too large"
        else:
            data = json.loads(path.read_bytes().decode("utf-8"))
            files = _entries(data)
            if files is None:
                why = "does not list files as sqexport writes them"
    except (OSError, ValueError):
        why = "is unreadable"
    if why is not None:
        raise OutputError(f"{folder}: {MANIFEST} {why}, so sqexport cannot tell which files it wrote; "
                          "choose another -o or empty the folder")
    return files


def _entries(data) -> dict[str, dict] | None:
    if not isinstance(data, dict) or not isinstance(data.get("files"), list):
        return None
    files = {}
    for entry in data["files"]:
        if not isinstance(entry, dict):
            return None
        rel, size, digest = entry.get("path"), entry.get("size"), entry.get("sha256")
        if not safe_relative(rel) or rel == MANIFEST or isinstance(size, bool) or not isinstance(size, int) \
                or size < 0 or not is_sha256(digest) or rel in files:
            return None
        files[rel] = {"size": size, "sha256": digest}
    return files


def _regular_below(folder: Path, rel: str) -> os.stat_result | None:
    """lstat of folder/rel when every part below `folder` is a real folder or, at the end, a
    regular file (no symlink anywhere below); None otherwise."""
    current = Path(folder)
    parts = PurePosixPath(rel).parts
    try:
        for i, part in enumerate(parts):
            current = current / part
            st = os.lstat(current)
            last = i == len(parts) - 1
            if (last and not stat.S_ISREG(st.st_mode)) or (not last and not stat.S_ISDIR(st.st_mode)):
                return None
    except OSError:
        return None
    return st


def owned(folder: Path, rel: str, files: dict[str, dict] | None = None) -> bool:
    """True when folder/rel is provably sqexport's: see the module docstring."""
    if not safe_relative(rel):
        return False
    files = read_manifest(folder) if files is None else files
    known = files.get(rel)
    st = _regular_below(folder, rel) if known else None
    return st is not None and st.st_size == known["size"] and sha256_file(Path(folder) / rel) == known["sha256"]


def write_manifest_entries(folder: Path, files: dict[str, dict]) -> None:
    """Write the manifest (temp file + rename: a reader never sees half of it)."""
    folder = Path(folder)
    body = {"tool": "sqexport", "version": 1,
            "files": [{"path": rel, **files[rel]} for rel in sorted(files)]}
    part = folder / f".{MANIFEST}.part-{os.getpid()}"
    try:
        part.write_text(json.dumps(body, indent=1) + "\n", encoding="utf-8")
        part.replace(folder / MANIFEST)
    except OSError as exc:
        part.unlink(missing_ok=True)
        raise OutputError(f"cannot write {folder / MANIFEST}: {exc.strerror or exc}") from None


def record(folder: Path, names: list[str]) -> None:
    """Add (or update) `names`, files sqexport has just written into `folder`, to its manifest,
    creating the manifest if the folder has none."""
    folder = Path(folder)
    files = read_manifest(folder) if manifest_exists(folder) else {}
    for rel in names:
        st = _regular_below(folder, rel)
        if not safe_relative(rel) or st is None:
            raise OutputError(f"{folder / rel}: not a regular file sqexport can record")
        files[rel] = {"size": st.st_size, "sha256": sha256_file(folder / rel)}
    write_manifest_entries(folder, files)


def sibling_output(path: Path, name: str) -> Path | None:
    """folder/name beside `path` (a model in an output folder) when the folder's manifest proves
    sqexport wrote it unchanged, and it is not `path` itself; else None."""
    folder = Path(path).absolute().parent
    candidate = folder / name
    try:
        if not manifest_exists(folder) or candidate.resolve() == Path(path).resolve():
            return None
        return candidate if owned(folder, name) else None
    except (OutputError, OSError):
        return None
