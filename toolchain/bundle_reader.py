"""Reading a `<name>-mobile.zip` for `sqexport bench`: the bundle is untrusted input.

Only three members are ever read: manifest.json, model.ort and reference.npz (never the bundle's
run_model.py or anything else: bench pushes the runner shipped inside sqexport). The manifest is
required and checked field by field; model.ort (and reference.npz when present) must match its
sha256. Reading is bounded before anything is inflated: at most MAX_MEMBERS members, MAX_TOTAL_BYTES
uncompressed, and no member over 1 MB inflating more than MAX_RATIO times (a 400 KB zip that
inflates to 300 MB is refused); while inflating, a member that yields more than its header
claimed is cut off and refused too.
"""
from __future__ import annotations

import json
import math
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from sqexport.contracts.errors import ConfigError
from sqexport.contracts.files import is_sha256, require_regular, sha256_file

__all__ = ["Bundle", "read_bundle", "MAX_MEMBERS", "MAX_TOTAL_BYTES", "MAX_RATIO", "MANIFEST_MAX_BYTES"]

MODEL, REFERENCE, MANIFEST = "model.ort", "reference.npz", "manifest.json"
MAX_MEMBERS = 256  # a bundle holds ~10 files (more with a tokenizer)
MAX_TOTAL_BYTES = 4 << 30  # a BERT-large-size int8 .ort plus its model.onnx fits easily
MAX_RATIO = 100  # model files deflate 1.1-5x; all-zero padding is what inflates 1000x
MANIFEST_MAX_BYTES = 16 << 20
_CHUNK = 1 << 20


@dataclass
class Bundle:
    model: Path
    reference: Path | None
    manifest: dict
    self_test: dict = field(default_factory=dict)  # rtol / max_rel_error, checked numbers only


def _bad(target: Path, why: str) -> ConfigError:
    return ConfigError(f"{target}: {why}")


def _check_sizes(target: Path, infos: list[zipfile.ZipInfo]) -> None:
    if len(infos) > MAX_MEMBERS:
        raise _bad(target, f"{len(infos)} members; a bundle has at most {MAX_MEMBERS}: refused (zip bomb?)")
    total = sum(i.file_size for i in infos)
    if total > MAX_TOTAL_BYTES:
        raise _bad(target, f"inflates to {total:,} bytes, more than {MAX_TOTAL_BYTES:,}: refused (zip bomb?)")
    for i in infos:
        if i.file_size > _CHUNK and i.file_size > MAX_RATIO * max(i.compress_size, 1):
            raise _bad(target, f"member {i.filename[:60]!r} inflates {i.file_size // max(i.compress_size, 1)}x "
                               f"(limit {MAX_RATIO}x): refused (zip bomb?)")


def _extract(zf: zipfile.ZipFile, info: zipfile.ZipInfo, dest: Path, target: Path) -> Path:
    """Inflate one member, never more bytes than its header declares."""
    written = 0
    with zf.open(info) as src, open(dest, "wb") as out:
        while True:
            block = src.read(_CHUNK)
            if not block:
                break
            written += len(block)
            if written > info.file_size:
                raise _bad(target, f"member {info.filename!r} holds more than its declared size: refused")
            out.write(block)
    return dest


def _manifest(zf: zipfile.ZipFile, infos: dict, target: Path) -> dict:
    info = infos.get(MANIFEST)
    if info is None:
        raise _bad(target, "no manifest.json: not an sqexport bundle (bench checks the model against "
                           "the manifest's sha256)")
    if info.file_size > MANIFEST_MAX_BYTES:
        raise _bad(target, "manifest.json is too large")
    try:
        data = json.loads(zf.read(info).decode("utf-8"))
    except (ValueError, RecursionError):
        raise _bad(target, "manifest.json is not valid JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise _bad(target, "manifest.json must be an object with a 'files' object (name -> sha256)")
    entry = data["files"].get(MODEL)
    if not isinstance(entry, dict) or not is_sha256(entry.get("sha256")):
        raise _bad(target, f"manifest.json has no sha256 for {MODEL}")
    return data


def _self_test(manifest: dict) -> dict:
    """The bundle's tolerances, taken only where they are positive finite numbers."""
    raw = manifest.get("self_test")
    out = {}
    for key in ("rtol", "max_rel_error"):
        value = raw.get(key) if isinstance(raw, dict) else None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
            out[key] = float(value)
    return out


def _verified(zf, infos: dict, name: str, manifest: dict, stage: Path, target: Path) -> Path:
    entry = manifest["files"].get(name)
    if not isinstance(entry, dict) or not is_sha256(entry.get("sha256")):
        raise _bad(target, f"manifest.json has no sha256 for {name}")
    path = _extract(zf, infos[name], stage / name, target)
    if sha256_file(path) != entry["sha256"]:
        raise _bad(target, f"{name} does not match its sha256 in manifest.json")
    return path


def read_bundle(target: Path, stage: Path) -> Bundle:
    """Check `target` and inflate its model (and reference data) into `stage`."""
    require_regular(target, "bundle")
    try:
        with zipfile.ZipFile(target) as zf:
            members = zf.infolist()
            _check_sizes(target, members)
            infos = {i.filename: i for i in members}
            if MODEL not in infos:
                raise _bad(target, "not an sqexport mobile bundle (no model.ort)")
            manifest = _manifest(zf, infos, target)
            model = _verified(zf, infos, MODEL, manifest, stage, target)
            ref = _verified(zf, infos, REFERENCE, manifest, stage, target) if REFERENCE in infos else None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError,
            OSError) as exc:
        raise _bad(target, f"not a readable zip: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") \
            from None
    return Bundle(model, ref, manifest, _self_test(manifest))
