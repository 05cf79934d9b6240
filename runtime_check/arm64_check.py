"""`--arch arm64`: the file's outputs on aarch64 onnxruntime (emulated, three CPU tiers) against this
host's outputs of the same file, and the accuracy gate judged on the ARM64 outputs."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np

from sqexport.runtime_check.accuracy import classification_metrics, embedding_metrics
from sqexport.runtime_check.agreement import per_sample_agreement, relative_errors
from sqexport.runtime_check.arm64 import ARM64_MAX_REL_ERROR, ARM64_RTOL, BUDGET_S, EMULATION_FACTOR, MAX_SAMPLES, TIERS, run_tiers
from sqexport.runtime_check.fixed_inputs import fit_batches, is_fixed, session_shapes
from sqexport.runtime_check.gates import Gates, evaluate_gates
from sqexport.runtime_check.mobile_check import compare_outputs
from sqexport.runtime_check.session import make_session

__all__ = ["verify_arm64"]


def _shapes(session, batches: list[dict]) -> dict[str, list[int]]:
    """The model's fixed shapes; for a dynamic model batch 1 and the largest size seen per dim
    (padding is exact for text: the attention mask hides it)."""
    shapes = session_shapes(session)
    if is_fixed(shapes):
        return shapes
    out = {}
    for name, dims in shapes.items():
        seen = [b[name].shape for b in batches if name in b]
        out[name] = [1] + [d if isinstance(d, int) and d > 0 else max(s[i] for s in seen)
                           for i, d in enumerate(dims) if i > 0]
    return out


def _post(raw: list, feeds: list[dict], postprocess: Callable) -> np.ndarray:
    return np.concatenate([postprocess([r[i] for r in raw], f) for i, f in enumerate(feeds)])


def _metrics(logits: bool, ref: np.ndarray, out: np.ndarray, labels) -> dict:
    if logits:
        return classification_metrics(ref, out, labels)
    return embedding_metrics(ref, out)


def _match(ref: np.ndarray, got: np.ndarray) -> dict:
    """Element-wise data (max |diff|, bit-identical) plus the per-sample agreement that decides."""
    out = {**compare_outputs(ref, got, ARM64_RTOL), **per_sample_agreement(ref, got)}
    out["within_abs_tolerance"] = out["within_tolerance"]
    out["within_tolerance"] = out["max_rel_error"] <= ARM64_MAX_REL_ERROR
    return out


def _closer_per_sample(exact: np.ndarray, kernels: np.ndarray, arm: np.ndarray) -> dict:
    """Each sample's ARM64 output against the closer of x86's two computations of the file.

    Either is legitimate: the exact QDQ arithmetic (x86's kernels may saturate full-range weights
    without VNNI) and onnxruntime's int8 kernels. Where a requantized activation lands on a
    rounding boundary the two x86 computations part by a few percent, and ARM's fixed-point
    requantization follows one or the other, sample by sample (all-MiniLM-L6-v2, 37 sentences:
    one sample equal to the exact arithmetic to 1e-7 and 2.6% from x86's kernels, another the
    other way round at 3.6%; the closer one is within 0.3% on every sample). A wrong kernel or a
    corrupted weight is far from both."""
    rel_exact, rel_kernels = relative_errors(exact, arm), relative_errors(kernels, arm)
    closer = np.minimum(rel_exact, rel_kernels)
    n_exact = int((rel_exact <= rel_kernels).sum())
    return {"max_rel_error": float(closer.max()) if closer.size else 0.0,
            "mean_rel_error": float(closer.mean()) if closer.size else 0.0,
            "samples_closer_to": {"exact QDQ arithmetic": n_exact, "x86 int8 kernels": int(len(closer) - n_exact)},
            "mostly": "exact QDQ arithmetic" if 2 * n_exact >= len(closer) else "x86 int8 kernels"}


def verify_arm64(model_path: Path, batches: list[dict], labels, base_out, logits: bool,
                 gates: Gates, postprocess: Callable, no_accuracy_gate: bool = False,
                 exact: Path | None = None, tiers=tuple(TIERS)) -> tuple[dict, list[dict]]:
    """Returns the report's `arm64` section and its checks (one output match and one accuracy gate
    per tier). ARM64 outputs are compared with x86's exact QDQ arithmetic (`exact`, an .onnx of the
    same model run without graph optimizations) and with x86's own int8 kernels (which saturate
    full-range int8 weights without VNNI, runtime_check/isa.py); per sample the closer one decides.
    Each tier runs for BUDGET_S at most, and all tiers are compared on the feeds every one of them
    ran. Emulated timings are never reported: they are not a phone's latency."""
    session = make_session(model_path, 1)
    fitted, n = fit_batches(batches, _shapes(session, batches))
    per_feed = len(next(iter(fitted[0].values())))
    feeds, raw, spent = [], [], 0.0
    for f in fitted[:max(1, MAX_SAMPLES // per_feed)]:
        if feeds and spent * EMULATION_FACTOR > BUDGET_S:
            break
        t0 = time.perf_counter()
        raw.append(session.run(None, f))
        spent += time.perf_counter() - t0
        feeds.append(f)
    names = [o.name for o in session.get_outputs()]
    tier_runs = run_tiers(model_path, feeds, tiers, budget_s=BUDGET_S)
    # each tier stops at its time budget: every tier is compared on the feeds all of them ran
    done = min(len(res["outputs"][names[0]]) for res in tier_runs.values())
    feeds, raw = feeds[:done], raw[:done]
    k = min(n, len(feeds) * per_feed)
    host = _post([np.stack(r) for r in zip(*raw)], feeds, postprocess)[:k]
    if exact is not None:
        ref_session = make_session(exact, 1, optimize=False)
        x86 = _post([np.stack(r) for r in zip(*[ref_session.run(None, f) for f in feeds])], feeds, postprocess)[:k]
    else:
        x86 = host
    reference = base_out[:k] if base_out is not None else x86
    subset_labels = labels[:k] if labels is not None else None
    section = {"samples": k, "rtol": ARM64_RTOL, "max_rel_error_limit": ARM64_MAX_REL_ERROR,
               "match_criterion": (f"per sample, ||arm64 - x86|| / ||x86|| <= {ARM64_MAX_REL_ERROR} over the whole "
                                   "output vector, against the closer of x86's two computations of the file (exact "
                                   "QDQ arithmetic, onnxruntime's int8 kernels) for that sample; max |diff| is "
                                   "reported as data"),
               "x86_reference": (f"{Path(exact).name} on x86 without graph optimizations (exact QDQ arithmetic)"
                                 if exact is not None else f"{Path(model_path).name} on x86 int8 kernels"),
               "accuracy_reference": "baseline" if base_out is not None else "x86 outputs",
               "note": "outputs only: timings under emulation are not latency", "tiers": {}}
    checks = []
    for tier, res in tier_runs.items():
        arm = _post([res["outputs"][nm][:done] for nm in names], feeds, postprocess)[:k]
        vs_x86, vs_kernels = _match(x86, arm), _match(host, arm)
        closer = _closer_per_sample(x86, host, arm)
        accuracy = _metrics(logits, reference, arm, subset_labels)
        section["tiers"][tier] = {"cpu_features": TIERS[tier], "vs_x86": vs_x86, "accuracy": accuracy,
                                  "vs_x86_int8_kernels": vs_kernels, "closer_per_sample": closer,
                                  "matches_x86": closer["max_rel_error"] <= ARM64_MAX_REL_ERROR,
                                  "closest_x86_reference": closer["mostly"],
                                  "onnxruntime": res["runner"].get("onnxruntime"), "machine": res["runner"].get("machine"),
                                  "model_sha256": res["runner"].get("model_sha256")}
        checks.append({"name": f"arm64_{tier}_matches_x86", "passed": section["tiers"][tier]["matches_x86"],
                       "value": closer["max_rel_error"], "limit": ARM64_MAX_REL_ERROR, "unit": "relative L2"})
        if not no_accuracy_gate:
            checks += [{**c, "name": f"arm64_{tier}_{c['name']}"}
                       for c in evaluate_gates(Gates(gates.max_accuracy_drop), accuracy, {})]
    return section, checks
