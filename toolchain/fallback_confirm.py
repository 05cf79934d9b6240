"""The accuracy fallback's choice measured where the gate will measure it: the exported graph in
onnxruntime on the evaluation split, and extended while the gate fails there.

Why onnxruntime and not the fake-quantized model in torch: the two round differently at float
rounding boundaries (one element in a few thousand after the first layer), and a deep network
carries those one-step differences on: on torchvision's pretrained MobileNetV2 a third of the
last blocks' int8 values differ (by up to 3-18 steps per tensor), and two of 16 crops changed
their top-1 class in onnxruntime that torch kept. On an evaluation split of 2 photos such a
sample is the whole gate.

The prediction (prediction.py) reads calibration data only and leaves the evaluation split held
out; a confirmation that returns more layers does not: the report says so (`held_out`) and
`fallback: {confirm: false}` turns it off.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from sqexport.contracts.progress import Progress
from sqexport.contracts.quant import QuantParams
from sqexport.contracts.tasks import Task
from sqexport.models.spec import ModelSpec
from sqexport.runtime_check.accuracy import drop_in_unit, run_session, task_metrics
from sqexport.runtime_check.session import make_session
from sqexport.toolchain.quantization.fallback import extend_until, finite_db

__all__ = ["ExportedGraphs", "confirm_on_eval"]

CONFIRM_GRAPH = "fallback-confirm.onnx"


@dataclass
class ExportedGraphs:
    """The graphs the gate will run, run on the evaluation split in onnxruntime as the gate runs
    them: model.onnx for a set of params (`write` puts it in `scratch`, the run's own temporary
    folder, only while it runs) and the run's `baseline_path` (baseline.onnx) when it exists."""

    write: Callable[[QuantParams, Path], None]
    spec: ModelSpec
    scratch: Path
    baseline_path: Path | None = None

    def _run(self, path: Path) -> np.ndarray:
        return run_session(make_session(path, spinning=False), self.spec.eval_batches, self.spec.postprocess)

    def outputs(self, params: QuantParams) -> np.ndarray:
        path = Path(self.scratch) / CONFIRM_GRAPH
        try:
            self.write(params, path)
            return self._run(path)
        finally:
            path.unlink(missing_ok=True)

    def baseline(self) -> np.ndarray | None:
        """baseline.onnx's evaluation outputs, the gate's reference (None without one: then the
        FP32 model in torch stands in). In onnxruntime it is also the fast way: 10,000 MNIST
        digits took 11 s through the torch model."""
        path = self.baseline_path
        return self._run(path) if path is not None and Path(path).is_file() else None


def confirm_on_eval(task: Task, spec: ModelSpec, params: QuantParams, fallen: list[dict],
                    ranking: Callable[[], list[str]], snr: dict[str, float],
                    exported: ExportedGraphs, dense_eval: np.ndarray, limit: float, cap: int,
                    progress: Progress) -> tuple[list[dict], dict]:
    """`fallen` (the prediction's choice, worst first) measured with the gate's metric against
    `dense_eval` (the FP32 model's evaluation outputs) and extended in the order of `ranking()`
    while the drop exceeds `limit` (fallback.extend_until, up to `cap` layers). Returns the fallen
    layers, each marked with what chose it, and the report's record."""
    def measured(p: QuantParams) -> float:
        return drop_in_unit(task, task_metrics(task, dense_eval, exported.outputs(p), spec.eval_labels))

    names, trace = extend_until(params, [f["layer"] for f in fallen], ranking, measured, limit, cap, progress)
    added = [{"layer": n, "snr_db": finite_db(snr[n]), "chosen_by": "evaluation split"}
             for n in names[len(fallen):]]
    chosen = [{**f, "chosen_by": f.get("chosen_by", "prediction")} for f in fallen] + added
    final = dict(trace)[len(names)]
    record = {"by": "the gate's metric on the evaluation split, the exported graph in onnxruntime",
              "samples": int(len(dense_eval)),
              "measured": [{"fallback_layers": k, "drop": round(d, 6)} for k, d in trace],
              "added_layers": len(added), "drop": round(final, 6), "holds": final <= limit, "held_out": not added}
    if added:
        record["why"] = (f"the prediction from calibration data held, but the exported graph measured "
                         f"{trace[0][1]:.4g} > {limit:g} on the evaluation split: {len(added)} more layer(s) "
                         "returned to FP32; the gate now rests on data that chose them, as NNCF's accuracy "
                         "control does (fallback: {confirm: false} keeps it held out)")
    return chosen, record
