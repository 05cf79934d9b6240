"""`sqexport package OUTDIR --target mobile`: the app bundle from an existing output folder.

report.json is data from disk: its fields are checked before use, and the zip's name derives from
its `model` field only as a plain file name. The zip replaces an existing file only when that
folder's `.sqexport-manifest.json` proves sqexport wrote it (toolchain/manifest.py), and the new
zip is recorded there, so the folder stays one sqexport can replace later.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from sqexport.contracts.errors import ConfigError
from sqexport.contracts.files import read_regular_bytes
from sqexport.contracts.targets import get_target, target_names
from sqexport.exporters.bundle import build_bundle, bundle_name
from sqexport.runtime_check.report_schema import schema_errors
from sqexport.toolchain.manifest import manifest_exists, owned, read_manifest, record

__all__ = ["package_outdir"]

REPORT_MAX_BYTES = 64 << 20


def _report(outdir: Path) -> dict:
    if not outdir.is_dir():
        raise ConfigError(f"{outdir} is not a folder: give the output folder of `sqexport MODEL --target mobile`")
    try:
        raw = read_regular_bytes(outdir / "report.json", "report", limit=REPORT_MAX_BYTES)
        report = json.loads(raw.decode("utf-8"))
    except (ConfigError, ValueError, RecursionError):
        raise ConfigError(f"{outdir} is not an sqexport output folder (no readable report.json)") from None
    if not isinstance(report, dict):
        raise ConfigError(f"{outdir}/report.json is not an sqexport report (a JSON object)")
    if not isinstance(report.get("model"), str) or not report["model"].strip():
        raise ConfigError(f"{outdir}/report.json names no model ('model' must be a name)")
    target = report.get("target")
    if not (isinstance(target, str) and target in target_names() and get_target(target).app_bundle) \
            or "mobile" not in report:
        raise ConfigError(f"{outdir} was exported with --target {str(report.get('target'))[:40]}; package needs the "
                          "output of `sqexport MODEL --target mobile` (full-range int8 weights, model.ort)")
    if not isinstance(report["mobile"], dict):
        raise ConfigError(f"{outdir}/report.json: 'mobile' must be the section sqexport writes (an object)")
    errors = schema_errors(report)
    if errors:
        raise ConfigError(f"{outdir}/report.json does not follow report.json's schema: {errors[0]}")
    return report


def _check_target(zip_path: Path) -> None:
    """An existing file is replaced only when its folder's manifest proves sqexport wrote it."""
    folder = zip_path.parent
    if not folder.is_dir():
        raise ConfigError(f"cannot write {zip_path}: {folder} is not a folder")
    files = read_manifest(folder) if manifest_exists(folder) else None  # a broken manifest: exit 2 now
    if os.path.lexists(zip_path) and not (files is not None and owned(folder, zip_path.name, files)):
        raise ConfigError(f"{zip_path} exists and sqexport's manifest does not show it wrote that file "
                          "(or it changed since): remove it or choose another -o")


def package_outdir(outdir: Path, zip_path: Path | None = None) -> dict:
    """Rebuild the bundle from OUTDIR's files and report.json. A cpu-target folder is refused: its
    weights are built for this host's x86 kernels (7-bit or pair-limited without VNNI), not for ARM's."""
    outdir = Path(outdir)
    report = _report(outdir)
    zip_path = Path(zip_path) if zip_path is not None else outdir / bundle_name(report["model"])
    zip_path = zip_path.parent.resolve() / zip_path.name  # the folder as it is; the file itself not followed
    _check_target(zip_path)
    info = build_bundle(outdir, report, zip_path)
    record(zip_path.parent, [zip_path.name])
    return {**info, "path": str(zip_path)}
