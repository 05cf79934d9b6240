"""One `check` of an existing .onnx/.ort model: what `sqexport check` and `sqexport.check()` both run.
Gates are not judged here: the result says whether they passed."""
from __future__ import annotations

from pathlib import Path

from sqexport.runtime_check.gates import Gates

__all__ = ["run_check", "BASELINE_FROM_FOLDER"]

BASELINE_FROM_FOLDER = "baseline.onnx in the model's output folder (sqexport's manifest proves it)"


def run_check(model: Path, baseline: Path | None = None, eval_data: Path | None = None, prep=None,
              threads: int | None = None, gates: Gates = Gates(), arch: str | None = None,
              target: str = "cpu") -> dict:
    """The check result (accuracy, latency_ms, checks, passed, ...). Without `baseline`, a model in
    an sqexport output folder is compared with that folder's baseline.onnx; the result's
    `baseline_from` then says so. A `target` with an app bundle (mobile) adds `mobile_usability`:
    which nodes NNAPI and CoreML would take, as `export --target mobile` reports it."""
    from sqexport.contracts.targets import get_target
    from sqexport.runtime_check.check import check_model
    from sqexport.runtime_check.session import default_threads
    from sqexport.toolchain.export_options import image_prep
    from sqexport.toolchain.manifest import sibling_output

    # in an output folder, sqexport's own baseline.onnx is the evidence the model is compared with
    found = None if baseline else sibling_output(Path(model), "baseline.onnx")
    result = check_model(Path(model), Path(baseline) if baseline else found, Path(eval_data) if eval_data else None,
                         threads or default_threads(), gates, prep if prep is not None else image_prep(None, None, None),
                         arch)
    if found is not None:
        result["baseline_from"] = BASELINE_FROM_FOLDER
    result["target"] = target
    if get_target(target).app_bundle:
        if Path(model).suffix == ".ort":
            result["mobile_usability"] = {"notes": ["an .ort file is already converted: check the .onnx it came "
                                                    "from for NNAPI/CoreML coverage"]}
        else:
            from sqexport.runtime_check.mobile_check import usability

            result["mobile_usability"] = usability(Path(model))
    return result
