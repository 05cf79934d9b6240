"""Choose how much to prune when the user did not say: the largest sparsity whose pruned FP32
model, measured in torch on the evaluation split and on the calibration data, keeps within a share
of the accuracy gate on both. A few photos give a handful of evaluation samples (8 photos: 16 crops
held out): torchvision's pretrained MobileNetV2 lost nothing on them at 0.15 sparsity and 2.6
points on the 48 calibration crops, and the int8 stage then had no budget left. Both splits count.

A fixed default (50 %) wrecked pretrained models nobody here tuned for: the pruning alone used
the whole budget before int8 ran. The search prunes a fresh copy of the model at each candidate
amount exactly as the run will (the method itself, then BatchNorm re-estimation where that measured
better), and bisects the grid of candidates assuming the drop grows with the amount; the report
lists every amount tried with its drop. Same data, same seed: same choice.

BatchNorm re-estimation is measured, not assumed: each amount is scored with the model's own
statistics and with statistics re-estimated on the calibration data, and the better counts (the
run then does what the chosen amount's better variant did). On a few photos re-estimation is what
hurts: torchvision's pretrained MobileNetV2 with 48 crops of 6 photos lost 10.2 points of
expected top-1 from re-estimated statistics alone, with nothing pruned.

The same share of the int8 stage's fidelity floor (fallback.min_cosine) bounds the pruned outputs:
an amount fits only if their mean cosine to the dense model's stays at least
1 - PRUNE_SHARE x (1 - floor) on both splits. The gate's metric (top-1, or expected top-1 without
labels) moves in steps of whole samples and can stay put while the outputs drift: pretrained
EfficientNet-Lite0 with a folder of 8 photos lost 0.1 points at 0.10 sparsity, while its cosine
fell to 0.9966 and its KL to FP32 on photos outside the folder nearly doubled (0.022 -> 0.038 for
the int8 model).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch

from sqexport.contracts.progress import NULL_PROGRESS, Progress
from sqexport.contracts.tasks import get_task
from sqexport.models.spec import ModelSpec, first_samples
from sqexport.runtime_check.accuracy import drop_in_unit, task_metrics
from sqexport.toolchain.bn_recalibration import recalibrate_batchnorm
from sqexport.toolchain.folding import copy_for_compression
from sqexport.toolchain.pruning import prunable_layers
from sqexport.toolchain.quantization.range_choice import output_error
from sqexport.toolchain.recipe import Stage
from sqexport.toolchain.stages import PruneContext

__all__ = ["PRUNE_SHARE", "MAX_SPARSITY", "GRID", "SparsityChoice", "choose_sparsity", "cosine_floor"]

# share of the accuracy gate the pruned FP32 model may use; int8 noise gets the rest
PRUNE_SHARE = 0.25
# At most the former fixed default: beyond it the pruned model's error on data the run never saw
# grows faster than the evaluation split shows (digits-cnn: 0.22 points at 0.75 on the split, yet
# the calibration-side prediction of the int8 model tripled), and unstructured zeros buy size only
MAX_SPARSITY = 0.5
GRID = tuple(round(0.05 * i, 2) for i in range(1, int(round(MAX_SPARSITY / 0.05)) + 1))  # 0.05 ... 0.50


@dataclass
class SparsityChoice:
    sparsity: float
    budget: float
    trace: list[dict]
    samples: int
    why: str
    # re-estimate BatchNorm statistics after pruning at the chosen amount (it measured better there)
    recalibrate_batchnorm: bool = False
    calibration_samples: int = 0
    min_cosine: float = 0.0  # the pruned outputs' cosine bound (0: none)

    def to_report(self, limit: float, unit: str) -> dict:
        return {"chosen": self.sparsity, "limit": limit, "share": PRUNE_SHARE, "budget": self.budget,
                "min_cosine": round(self.min_cosine, 6),
                "unit": unit, "evaluation_samples": self.samples, "calibration_samples": self.calibration_samples,
                "tried": self.trace, "why": self.why, "recalibrate_batchnorm": self.recalibrate_batchnorm,
                "how": "pruned FP32 copy (the method, then BatchNorm statistics kept or re-estimated on the "
                       "calibration data, whichever drops less on the evaluation split) against the dense model, "
                       "in torch, on the evaluation split and the first calibration samples: an amount fits when "
                       "both drops are within the budget and both outputs' mean cosine to the dense model's is at "
                       "least min_cosine; bisection over 0.05 steps up to 0.50"}


def cosine_floor(fidelity_floor: float) -> float:
    """The pruned FP32 outputs' cosine bound: PRUNE_SHARE of the int8 fidelity floor's margin
    (0.99 -> 0.9975); 0 (no floor) -> 0 (no bound)."""
    return 1.0 - PRUNE_SHARE * (1.0 - fidelity_floor) if fidelity_floor > 0 else 0.0


CALIBRATION_SAMPLES = 512  # calibration samples each amount is also scored on (fewer if the data has fewer)


def _outputs(spec: ModelSpec, model: torch.nn.Module, batches: list) -> np.ndarray:
    return np.concatenate([spec.postprocess(spec.torch_outputs(model, b), b) for b in batches])


def choose_sparsity(spec: ModelSpec, stage: Stage, context: Callable[[dict], PruneContext],
                    handler: Callable, limit: float, prefix: str = "",
                    progress: Progress = NULL_PROGRESS, fidelity_floor: float = 0.0) -> SparsityChoice:
    """Bisect GRID for the largest amount whose drop is within PRUNE_SHARE x `limit` and whose
    outputs keep cosine_floor(`fidelity_floor`) to the dense model's."""
    task = get_task(spec.task)
    budget = PRUNE_SHARE * limit
    min_cos = cosine_floor(fidelity_floor)
    splits = {"evaluation": (spec.eval_batches, spec.eval_labels)}
    calib = first_samples(spec.calib_batches, CALIBRATION_SAMPLES)
    if calib:
        labels = getattr(spec, "calib_labels", None)
        splits["calibration"] = (calib, None if labels is None else labels[:sum(len(next(iter(b.values()))) for b in calib)])
    dense = {name: _outputs(spec, spec.model, batches) for name, (batches, _) in splits.items()}
    samples = len(dense["evaluation"])
    trace: list[dict] = []
    recalibrated: dict[float, bool] = {}

    def drops_of(model) -> dict[str, tuple[float, float]]:
        """split -> (drop, mean cosine of the outputs to the dense model's)"""
        out = {}
        for name, (batches, labels) in splits.items():
            pruned = _outputs(spec, model, batches)
            out[name] = (float(drop_in_unit(task, task_metrics(task, dense[name], pruned, labels))),
                         1.0 - output_error(dense[name], pruned))
        return out

    def fits(result: dict[str, tuple[float, float]]) -> bool:
        return max(d for d, _ in result.values()) <= budget and min(c for _, c in result.values()) >= min_cos

    def fits_at(amount: float) -> bool:
        model = copy_for_compression(spec.model)
        layers = prunable_layers(model, prefix)
        handler(model, replace(stage.config, sparsity=amount), context(layers))
        kept = drops_of(model)
        row = {"sparsity": amount}
        chosen = kept
        if recalibrate_batchnorm(model, spec.calib_batches, spec.torch_outputs):
            again = drops_of(model)
            # the variant that fits; between two that both fit or both miss, the smaller drop on the
            # evaluation split (statistics re-estimated on the calibration data fit it by
            # construction), then the closer outputs (drops move in whole samples: ties are common)
            def rank(r):
                return fits(r), -r["evaluation"][0], r["evaluation"][1]
            row.update(drop_batchnorm_kept=round(kept["evaluation"][0], 6),
                       drop_batchnorm_reestimated=round(again["evaluation"][0], 6))
            recalibrated[amount] = rank(again) > rank(kept)
            chosen = again if recalibrated[amount] else kept
        value = max(d for d, _ in chosen.values())  # every split within the budget
        cosine = min(c for _, c in chosen.values())
        row.update({f"drop_{name}": round(d, 6) for name, (d, _) in chosen.items()})
        row.update({f"cosine_{name}": round(c, 6) for name, (_, c) in chosen.items()})
        row.update(drop=round(value, 6), cosine=round(cosine, 6), fits=fits(chosen),
                   batchnorm="re-estimated" if recalibrated.get(amount) else "kept")
        trace.append(row)
        progress.message(f"  sparsity {amount:.2f}: pruned FP32 drop {value:.4g} "
                         f"({'within' if value <= budget else 'over'} the budget {budget:.4g}), cosine {cosine:.4f}"
                         + (f" ({'at least' if cosine >= min_cos else 'below'} {min_cos:g})" if min_cos else ""))
        return row["fits"]

    lo, hi = -1, len(GRID)  # GRID[lo] fits (lo = -1: nothing tried fits yet), GRID[hi] does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits_at(GRID[mid]):
            lo = mid
        else:
            hi = mid
    chosen = GRID[lo] if lo >= 0 else 0.0
    keeps = f" and keeps its outputs' cosine to the dense model's at {min_cos:g} or more" if min_cos else ""
    if lo < 0:
        why = (f"even {GRID[0]:.2f} sparsity costs more than {PRUNE_SHARE:.0%} of the accuracy gate "
               f"({budget:.4g}) on the pruned FP32 model" + (f" or its outputs' cosine falls below {min_cos:g}" if min_cos else "")
               + ": nothing pruned")
    else:
        why = (f"the largest sparsity (0.05 steps, at most {MAX_SPARSITY:.2f}) whose pruned FP32 model stays within {PRUNE_SHARE:.0%} of "
               f"the accuracy gate ({budget:.4g}){keeps}, leaving the rest for int8; pass --sparsity to choose it yourself")
    trace.sort(key=lambda t: t["sparsity"])
    calib_samples = len(dense.get("calibration", ()))
    return SparsityChoice(chosen, budget, trace, samples, why, recalibrated.get(chosen, False), calib_samples, min_cos)
