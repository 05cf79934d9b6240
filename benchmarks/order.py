"""Order study: sparsity then quantization (S->Q, sqexport's default) vs Q->S.

Harma et al., "Effective Interplay between Sparsity and Quantization" (arXiv 2405.20935): with
magnitude sparsity and max-scaled per-channel quantization, S->Q adds no error beyond the two
individual errors (Thm 3.5); Q->S can be strictly worse (Thm 3.6).

For MiniLM (all-MiniLM-L6-v2) and mnist-resnet, at 50% unstructured magnitude sparsity (global, the
CLI default) and 2:4, with int8 (|q| <= 127) and int4 (|q| <= 7) per-channel symmetric weight
quantization (contracts.quant, the int8 params code with a different qmax), it reports:

- per layer, the weight error ||f(W) - W||_F of S->Q and of Q->S (and how many layers each wins);
- the end metric for dense, S only, Q only, S->Q and Q->S: top-1 on the first 2000 MNIST test
  images, mean cosine vs FP32 on the held-out corpus texts for MiniLM;
- the orthogonality bound m_S + m_Q - m_dense (the paper's bound for a lower-is-better error
  e = 1 - m, rewritten for these higher-is-better metrics): S->Q landing below it means the
  two errors compound.

Weight-only fake quantization in torch (activations stay FP32); after pruning mnist-resnet's
BatchNorm statistics are re-estimated on the calibration split, as the pipeline does.
Per-channel BN folding commutes with per-channel symmetric quantization, so quantizing before
folding is the same. Run by hand: `python benchmarks/order.py` (about 5-10 minutes).
"""
from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from sqexport.contracts.tasks import get_task  # noqa: E402
from sqexport.models.spec import first_samples  # noqa: E402
from sqexport.models.zoo import load_model  # noqa: E402
from sqexport.runtime_check.accuracy import task_metrics  # noqa: E402
from sqexport.toolchain.bn_recalibration import recalibrate_batchnorm  # noqa: E402
from sqexport.toolchain.order import fake_quant_weight  # noqa: E402
from sqexport.toolchain.pruning import prunable_layers  # noqa: E402
from sqexport.toolchain.pruning.magnitude import magnitude_masks  # noqa: E402
from sqexport.toolchain.pruning.nm import nm_mask  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SPARSITIES = {"50%": lambda ws: magnitude_masks(ws, 0.5, "global"),
              "2:4": lambda ws: {n: nm_mask(w, 2, 4) for n, w in ws.items()}}
QUANTS = {"int8": 127, "int4": 7}
EVAL_IMAGES = 2000


def log(msg: str) -> None:
    print(f"[order] {msg}", file=sys.stderr, flush=True)


def _metric(spec, dense_out, model) -> float:
    batches = spec.eval_batches if spec.task != "image-classification" else first_samples(spec.eval_batches, EVAL_IMAGES)
    out = np.concatenate([spec.postprocess(spec.torch_outputs(model, b), b) for b in batches])
    labels = spec.eval_labels[:len(out)] if spec.eval_labels is not None else None
    return task_metrics(get_task(spec.task), dense_out, out, labels)["model"]


def _variant(spec, transform) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A copy of the model whose prunable weights are transform(name -> W) (returned too)."""
    model = copy.deepcopy(spec.model).eval()
    layers = prunable_layers(model, spec.prune_prefix)
    new = transform({n: m.weight.detach().clone() for n, m in layers.items()})
    with torch.no_grad():
        for n, m in layers.items():
            m.weight.copy_(new[n])
    return model, new


def _transforms(sparsify, qmax):
    def s_only(ws):
        masks = sparsify(ws)
        return {n: w * masks[n] for n, w in ws.items()}

    def q_only(ws):
        return {n: fake_quant_weight(w, qmax) for n, w in ws.items()}

    def s_then_q(ws):
        return q_only(s_only(ws))

    def q_then_s(ws):
        return s_only(q_only(ws))
    return {"S": s_only, "Q": q_only, "S->Q": s_then_q, "Q->S": q_then_s}


def study(name: str) -> dict:
    spec = load_model(name)
    batches = spec.eval_batches if spec.task != "image-classification" else first_samples(spec.eval_batches, EVAL_IMAGES)
    dense_out = np.concatenate([spec.postprocess(spec.torch_outputs(spec.model, b), b) for b in batches])
    dense_w = {n: m.weight.detach().clone() for n, m in prunable_layers(spec.model, spec.prune_prefix).items()}
    m_dense = _metric(spec, dense_out, spec.model)
    rows, layers, cache = [], {}, {}
    for s_name, sparsify in SPARSITIES.items():
        for q_name, qmax in QUANTS.items():
            metrics, weights = {"dense": m_dense}, {}
            for t_name, t in _transforms(sparsify, qmax).items():
                key = t_name if t_name not in ("S", "Q") else f"{t_name}:{s_name if t_name == 'S' else q_name}"
                if key in cache:
                    metrics[t_name] = cache[key]
                    continue
                model, weights[t_name] = _variant(spec, t)
                if "S" in t_name:  # pruning moves activation statistics: BN re-estimated, as the pipeline does
                    recalibrate_batchnorm(model, spec.calib_batches, spec.torch_outputs)
                metrics[t_name] = _metric(spec, dense_out, model)
                if t_name in ("S", "Q"):
                    cache[key] = metrics[t_name]
                log(f"{name} {s_name} {q_name} {t_name}: {metrics[t_name]:.4f}")
            err = {n: {o: float((weights[o][n] - w).norm()) for o in ("S->Q", "Q->S")} for n, w in dense_w.items()}
            layers[f"{s_name} {q_name}"] = err
            wins = {"S->Q": sum(e["S->Q"] < e["Q->S"] for e in err.values()),
                    "tie": sum(e["S->Q"] == e["Q->S"] for e in err.values()),
                    "Q->S": sum(e["S->Q"] > e["Q->S"] for e in err.values())}
            total = {o: float(sum(e[o] ** 2 for e in err.values()) ** 0.5) for o in ("S->Q", "Q->S")}
            bound = metrics["S"] + metrics["Q"] - metrics["dense"]
            rows.append({"model": name, "sparsity": s_name, "quant": q_name, **metrics, "bound": bound,
                         "weight_error": total, "layer_wins": wins, "layers": len(err)})
    return {"rows": rows, "layers": layers, "metric": "top-1 %" if spec.eval_labels is not None else "mean cosine"}


def table(results: dict[str, dict]) -> str:
    head = ("| model | S | Q | dense | S only | Q only | S->Q | Q->S | bound m_S+m_Q-m_dense | ||f(W)-W|| S->Q / Q->S "
            "| layers S->Q better / tie / Q->S better |")
    lines = [head, "|" + "---|" * 11]
    for name, res in results.items():
        digits = 2 if res["metric"].startswith("top") else 4
        for r in res["rows"]:
            f = lambda v: f"{v:.{digits}f}"  # noqa: E731
            w, lw = r["weight_error"], r["layer_wins"]
            lines.append(f"| {name} ({res['metric']}) | {r['sparsity']} | {r['quant']} | {f(r['dense'])} | {f(r['S'])} "
                         f"| {f(r['Q'])} | {f(r['S->Q'])} | {f(r['Q->S'])} | {f(r['bound'])} "
                         f"| {w['S->Q']:.3f} / {w['Q->S']:.3f} | {lw['S->Q']} / {lw['tie']} / {lw['Q->S']} |")
    return "\n".join(lines)


def main() -> None:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    results = {name: study(name) for name in sys.argv[1:] or ("mnist-resnet", "minilm")}
    text = table(results)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "order.json").write_text(json.dumps(results, indent=1))
    (RESULTS / "order.md").write_text("# Order study (benchmarks/order.py)\n\n" + text + "\n")


if __name__ == "__main__":
    main()
