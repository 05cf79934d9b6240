"""`sqexport package OUTDIR --target mobile`: the app bundle from an existing output folder."""
from __future__ import annotations

import json
from pathlib import Path

from contracts.errors import ConfigError
from exporters.bundle import build_bundle, bundle_name

__all__ = ["package_outdir"]


def package_outdir(outdir: Path, zip_path: Path | None = None) -> dict:
    """Rebuild the bundle from OUTDIR's files and report.json. A cpu-target folder is refused: its
    weights are 7-bit for this host's x86 kernels, not the full int8 range ARM kernels take."""
    outdir = Path(outdir)
    try:
        report = json.loads((outdir / "report.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise ConfigError(f"{outdir} is not an sqexport output folder (no readable report.json)") from None
    if report.get("target") != "mobile" or "mobile" not in report:
        raise ConfigError(f"{outdir} was exported with --target {report.get('target')}; package needs the "
                          "output of `sqexport MODEL --target mobile` (full-range int8 weights, model.ort)")
    if zip_path is not None and zip_path.parent and not zip_path.parent.is_dir():
        raise ConfigError(f"cannot write {zip_path}: {zip_path.parent} is not a folder")
    info = build_bundle(outdir, report, zip_path)
    return {**info, "path": str(zip_path or outdir / bundle_name(report["model"]))}
