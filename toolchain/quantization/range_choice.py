"""The default activation ranges (`observer: auto`): min-max or a percentile clip, whichever keeps
the model's calibration outputs closer to FP32.

Neither range method wins everywhere, and per tensor they cannot be told apart: what decides is
how the network carries the error. Clipping the rare large values (percentile) gives the common
ones a finer grid, but its error is systematic and adds up layer after layer; min-max rounds only,
at a coarser step. Measured on the zoo of benchmarks/results/zoo.md (cosine of logits to FP32 on
held-out photos): the percentile won on RepVGG-A0 (0.724 -> 0.930) and GhostNet (0.992 -> 0.997)
and lost on MobileNetV3-Small (0.983 -> 0.964); on all-MiniLM-L6-v2 it cut the mean cosine from
0.992 to 0.906 (BERT's few huge channels matter). Single tensors swapped between the two moved
the whole model by at most 0.003 on MobileNetV3: the effect is the sum, so the choice is made for
the whole model, on its outputs.

Min-max stays unless the percentile's output error is at most WIN_RATIO of it: a clear win on
calibration data, not a tie decided by noise.
"""
from __future__ import annotations

import numpy as np

__all__ = ["AUTO", "CANDIDATES", "WIN_RATIO", "CHOICE_SAMPLES", "output_error", "choose_range"]

AUTO = "auto"
CANDIDATES = ("minmax", "percentile")  # the first is the default the others must clearly beat
WIN_RATIO = 0.8
CHOICE_SAMPLES = 128  # calibration samples the outputs are compared on (fewer if the data has fewer)


def output_error(fp32: np.ndarray, quantized: np.ndarray) -> float:
    """How far the quantized outputs are from FP32's: the mean over samples of 1 - cosine of the
    whole output (logits or embeddings). Not the KL of the softmax: on logits whose softmax is
    saturated it hardly moves (RepVGG-A0 with random weights: 0.0176 for min-max, 0.0171 for the
    percentile, while 1 - cosine on held-out photos was 0.276 against 0.070)."""
    fp = fp32.astype(np.float64).reshape(len(fp32), -1)
    q = quantized.astype(np.float64).reshape(len(quantized), -1)
    cos = (fp * q).sum(-1) / np.maximum(np.linalg.norm(fp, axis=-1) * np.linalg.norm(q, axis=-1), 1e-300)
    return float(np.mean(1.0 - cos))


def choose_range(errors: dict[str, float], percentile: float) -> tuple[str, dict]:
    """The chosen observer of `errors` (observer -> output error, CANDIDATES order) and the report's
    record of the choice."""
    default, *others = [c for c in CANDIDATES if c in errors]
    chosen = default
    for name in others:
        if errors[name] <= WIN_RATIO * errors[default] and errors[name] < errors[chosen]:
            chosen = name
    clip = f"the {percentile:g}th percentile"
    if chosen == default:
        why = (f"min-max kept the outputs at least as close to FP32 as {clip} would within the {WIN_RATIO:g}x "
               "margin a change needs")
    else:
        why = (f"{clip} clips the rare large activations; it left {errors[chosen] / max(errors[default], 1e-300):.2f}x "
               "min-max's output error")
    return chosen, {"chosen": chosen, "output_error": {k: float(f"{v:.6g}") for k, v in errors.items()},
                    "percentile": percentile, "why": why}
