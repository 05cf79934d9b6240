"""Task metrics and fidelity against the FP32 reference."""
from __future__ import annotations

from typing import Callable

import numpy as np
import onnxruntime as ort

from sqexport.contracts.tasks import Task
from sqexport.contracts.units import metric_units

# below this mean FP32 top-1 probability (%) the expected top-1 has little power: said in the note
UNSURE_BELOW = 20.0
AGREEMENT_ONLY = "agreement with FP32 (no labels): top-1 of the model vs the FP32 model's top-1"
NO_LABELS = ("no labels: top-1 expected under the FP32 model's own class probabilities (a prediction counts "
             "with the probability FP32 gives its class); top-1 agreement with FP32 is agreement_with_baseline")

__all__ = ["NO_LABELS", "run_session", "classification_metrics", "expected_top1", "embedding_metrics", "spearman", "softmax_kl",
           "topk_agreement", "task_metrics", "drop_in_unit", "nonfinite_share", "nonfinite_outputs"]


def run_session(session: ort.InferenceSession, batches: list[dict], postprocess: Callable) -> np.ndarray:
    names = {i.name for i in session.get_inputs()}
    outs = []
    for batch in batches:
        feed = {k: v for k, v in batch.items() if k in names}
        outs.append(postprocess(session.run(None, feed), batch))
    return np.concatenate(outs)


def _with_units(metrics: dict) -> dict:
    unit, drop_unit = metric_units(metrics["metric"])
    return {"metric": metrics["metric"], "unit": unit, **{k: v for k, v in metrics.items() if k != "metric"},
            "drop_unit": drop_unit}


def nonfinite_share(x: np.ndarray) -> float:
    """Share of NaN or infinite values. All-NaN logits agree with each other perfectly (argmax 0
    on both sides), so agreement alone would pass a model that computes nothing."""
    x = np.asarray(x)
    if x.size == 0 or x.dtype.kind not in "fc":
        return 0.0
    return float(x.size - np.count_nonzero(np.isfinite(x))) / x.size


def nonfinite_outputs(base: np.ndarray | None, model: np.ndarray) -> dict:
    """{"baseline": share, "model": share}: read by runtime_check.gates (check `finite_outputs`)."""
    out = {"model": nonfinite_share(model)}
    if base is not None:
        out["baseline"] = nonfinite_share(base)
    return out


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def softmax_kl(base_logits: np.ndarray, model_logits: np.ndarray) -> np.ndarray:
    """Per-sample KL(softmax(base) || softmax(model)) in nats: how much of the FP32 model's
    belief the compressed model loses, smooth where top-1 agreement moves in steps."""
    lp, lq = _log_softmax(base_logits), _log_softmax(model_logits)
    return (np.exp(lp) * (lp - lq)).sum(-1)


def expected_top1(base_logits: np.ndarray, predictions: np.ndarray) -> float:
    """Top-1 accuracy in % that the FP32 model's softmax expects of `predictions`: the mean over
    samples of the probability FP32 gives the predicted class. Without labels this is the drop a
    calibrated FP32 model predicts: a flip between two classes FP32 holds nearly equally likely
    costs little, a flip away from a confident prediction costs its confidence. (Raw agreement
    counts both as a full lost sample, which no int8 model of a 1000-class net on ambiguous photos
    can keep within a 1-point gate.)"""
    if not len(predictions):
        return 0.0
    p = np.exp(_log_softmax(base_logits))
    return 100.0 * float(p[np.arange(len(predictions)), predictions].mean())


def topk_agreement(base_logits: np.ndarray, model_logits: np.ndarray, k: int = 5) -> float:
    """Share of samples whose top-k class sets are equal (as sets, order ignored)."""
    k = min(k, base_logits.shape[-1])
    if k <= 1:
        return float((base_logits.argmax(-1) == model_logits.argmax(-1)).mean())
    b = np.sort(np.argpartition(-base_logits, k - 1, axis=-1)[:, :k], -1)
    m = np.sort(np.argpartition(-model_logits, k - 1, axis=-1)[:, :k], -1)
    return float((b == m).all(-1).mean())


def classification_metrics(base_logits: np.ndarray, model_logits: np.ndarray,
                           labels: np.ndarray | None, agreement: bool = False) -> dict:
    """top-1 vs labels when there are labels, else the top-1 the FP32 model's own probabilities
    expect of each model (`top1_expected`, expected_top1: the gate reads its drop). Always also:
    top-1 and top-5 agreement with FP32 and the mean KL(FP32 softmax || model softmax), which need
    no labels. `agreement`: without labels gate raw top-1 agreement instead (`top1_agreement`:
    synthetic inputs, where FP32's probabilities mean nothing and only sameness is checked).
    Shares are in percent and the drop in percentage points (the gate's unit, contracts/units.py);
    KL in nats."""
    base_pred, model_pred = base_logits.argmax(-1), model_logits.argmax(-1)
    agreement_share = 100.0 * float((base_pred == model_pred).mean())
    if labels is not None:
        base, model = 100.0 * float((base_pred == labels).mean()), 100.0 * float((model_pred == labels).mean())
        metric = "top1"
    elif agreement:
        base, model, metric = 100.0, agreement_share, "top1_agreement"
    else:
        base, model = expected_top1(base_logits, base_pred), expected_top1(base_logits, model_pred)
        metric = "top1_expected"
    kl = softmax_kl(base_logits, model_logits)
    out = _with_units({"metric": metric, "baseline": base, "model": model, "drop": base - model,
                       "agreement_with_baseline": agreement_share,
                       "top5_agreement": 100.0 * topk_agreement(base_logits, model_logits, 5),
                       "kl_to_baseline": float(kl.mean()), "samples": int(len(base_logits)),
                       "nonfinite_outputs": nonfinite_outputs(base_logits, model_logits)})
    if labels is None:
        out["note"] = AGREEMENT_ONLY if agreement else NO_LABELS
        if not agreement and base < UNSURE_BELOW:
            out["note"] += (f". FP32 is unsure of these samples (it gives its own top-1 {base:.1f}% on average): "
                            f"every flip is cheap, so the expected drop says little; read top-1 agreement "
                            f"({agreement_share:.1f}%) and KL ({out['kl_to_baseline']:.3g}) beside it")
    return out


def _rank(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), np.float64)
    ranks[order] = np.arange(len(x))
    # average ranks over ties so equal similarities do not create spurious order
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=ranks)
    return (sums / counts)[inv]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = _rank(np.asarray(a, np.float64)), _rank(np.asarray(b, np.float64))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = np.sqrt((ra ** 2).sum() * (rb ** 2).sum())
    return float((ra * rb).sum() / denom) if denom > 0 else 1.0


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def embedding_metrics(base: np.ndarray, model: np.ndarray) -> dict:
    """Cosine of each embedding to its FP32 reference, and Spearman correlation of the pairwise
    similarity matrices (upper triangle): does the compressed model rank pairs the same way?"""
    b, m = _normalize(base.astype(np.float64)), _normalize(model.astype(np.float64))
    cos = (b * m).sum(-1)
    iu = np.triu_indices(len(b), k=1)
    rho = spearman((b @ b.T)[iu], (m @ m.T)[iu]) if len(b) > 2 else 1.0
    return _with_units({"metric": "cosine", "baseline": 1.0, "model": float(cos.mean()),
                        "drop": float(1.0 - cos.mean()), "min_cosine": float(cos.min()), "spearman": rho,
                        "nonfinite_outputs": nonfinite_outputs(base, model)})


def task_metrics(task: Task, base: np.ndarray, model: np.ndarray, labels: np.ndarray | None = None,
                 agreement: bool = False) -> dict:
    """The task's metric of `model` outputs against the FP32 `base` outputs (postprocessed).
    NaN/inf outputs make numpy warn; the `finite_outputs` check reports them instead."""
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        if task.output == "embeddings":
            return embedding_metrics(base, model)
        return classification_metrics(base, model, labels, agreement)


def drop_in_unit(task: Task, metrics: dict) -> float:
    """The accuracy drop in the unit of the task's gate (points, or 1 - cosine): the metrics'
    own drop, which contracts/units.py puts in that unit."""
    return metrics["drop"]
