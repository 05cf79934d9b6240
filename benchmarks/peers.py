"""sqexport's defaults next to the two peers people reach for, on the same FP32 graph: onnxruntime's
own quantizer (the fast one) and NNCF (the faithful one), for MobileNetV2 and MiniLM in one run.

For each model:

  fp32            baseline.onnx of `sqexport export MODEL` (every default): the reference for every
                  ratio, and the graph every peer quantizes
  sqexport        model.onnx of that same run (what a user gets)
  ort-static      MobileNetV2: onnxruntime quantize_static, QDQ, min-max, per-tensor weights
                  (benchmarks/mobilenet.py's `ort-minmax`, benchmarks/zoo.py's peer)
  ort-static-pc   MobileNetV2: the same with per_channel=True
  ort-dynamic     MiniLM: quantize_dynamic(per_channel=True, weight_type=QInt8) (benchmarks/minilm.py)
  nncf            nncf.quantize(baseline, default preset); MiniLM also with
  nncf-transformer  model_type=nncf.ModelType.TRANSFORMER (MIXED preset, SmoothQuant 0.95 on MatMuls)

NNCF runs in its own venv (--nncf-python, default .venv-nncf/bin/python, made by `make nncf`; it
needs nncf, onnx and onnxruntime, no torch) as a child process of this script (`peers.py nncf-worker ...`), so this
process stays in the project venv. Every peer calibrates on sqexport's own calibration samples of
the model (ModelSpec.calib_batches: 160 crops of 10 photos; 252 corpus texts), NNCF one sample at a
time (its recommended batch 1; texts without their padding), quantize_static 8 crops at a time.

Fidelity, on the held-out samples sqexport evaluates on (ModelSpec.eval_batches: 336 crops of 7
other photos; the 168 held-out corpus texts): images KL(FP32 softmax || model softmax) and top-1
agreement with FP32; texts mean (and min) cosine of the pooled embeddings to FP32.
Speed: p50 of batch 1 (one held-out crop; one held-out sentence padded to 128 tokens), 1 thread,
every model of the model family interleaved round-robin in one loop; the loop is repeated --repeats
times (under one hold of --lock: keep repeats x budget under a few minutes) and the table gives the median over repeats of each repeat's p50 and of its ratio fp32 p50 / model p50.

Structure: Q/DQ pairs by the op they feed (weights / activations, per-channel or per-tensor,
signedness of the activation zero points), weight ops left FP32, and the ops onnxruntime really runs
after its graph optimizations (SessionOptions.optimized_model_filepath): QLinearConv, QGemm,
MatMulInteger, ... against FP32 Conv/MatMul and leftover QuantizeLinear/DequantizeLinear.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/peers.py --lock /tmp/heavy.lock [--workdir DIR] [--reuse]
        [--models mobilenet-v2,minilm] [--repeats 7] [--budget 20] [--ablations] [--experiments]

--ablations adds NNCF variants with one of its choices switched off (fidelity only; their speed is
the NNCF graph's). --experiments adds `nncf-ort` (NNCF's graph with the same numbers in the form
onnxruntime's x86 fusions accept: nncf_for_ort; timed) and sqexport's default recipe with one
change (7-bit weights as on a host without VNNI, NNCF's activation estimator, NNCF's SmoothQuant
alpha; fidelity only). Writes benchmarks/results/peers.{json,md} (not with --models or --no-write).
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
NNCF_PYTHON = str(Path(__file__).resolve().parent.parent / ".venv-nncf" / "bin" / "python")
MODELS = ("mobilenet-v2", "minilm")


def log(msg: str) -> None:
    print(f"[peers] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ NNCF, in its own venv

def save_samples(samples: list[dict], path: Path) -> None:
    """Calibration samples (one dict of input arrays each) as one .npz: key '<i>/<input name>'."""
    np.savez(path, **{f"{i}/{k}": v for i, s in enumerate(samples) for k, v in s.items()})


def load_samples(path: Path) -> list[dict]:
    data = np.load(path)
    out: dict[int, dict] = {}
    for key in data.files:
        i, name = key.split("/", 1)
        out.setdefault(int(i), {})[name] = data[key]
    return [out[i] for i in sorted(out)]


NNCF_OPTIONS = {  # worker option -> what it changes in nncf.quantize (the ablations)
    "model_type": "model_type=nncf.ModelType.<value>",
    "fast_bias_correction_off": "advanced: disable_bias_correction=True",
    "overflow_fix_off": "advanced: overflow_fix=OverflowFix.DISABLE (first conv keeps 8-bit weights)",
    "act_minmax": "advanced: activations_range_estimator_params=MINMAX (global min/max, not the mean per sample)",
    "smooth_quant_off": "advanced: smooth_quant_alphas matmul=-1",
    "preset": "preset=QuantizationPreset.<value>",
    "act_per_tensor": "advanced: activations_quantization_params=QuantizationParameters(per_channel=False)",
    "accuracy_control": "nncf.quantize_with_accuracy_control on sqexport's held-out samples, sqexport's metric and "
                        "gate (max_drop absolute): {eval: .npz, metric: top1_expected|cosine, max_drop}",
}


def _pooled(out, batch):
    """Sentence embeddings as sqexport's MiniLM gate sees them: masked mean of the last hidden state."""
    import numpy as np_

    if out.ndim == 3 and "attention_mask" in batch:
        mask = batch["attention_mask"][..., None].astype(out.dtype)
        out = (out * mask).sum(1) / np_.maximum(mask.sum(1), 1e-9)
    return out / np_.maximum(np_.linalg.norm(out, axis=-1, keepdims=True), 1e-12)


def _validation(fp32_path: str, metric: str):
    """validation_fn for quantize_with_accuracy_control: the metric sqexport gates on, against the
    FP32 model's outputs (higher is better), and its value per item (one sample each), which NNCF
    ranks by. NNCF validates subsets too, so the FP32 reference is looked up per item."""
    import numpy as np_
    import onnxruntime as ort_

    fp32 = ort_.InferenceSession(fp32_path, providers=["CPUExecutionProvider"])
    reference: dict[int, np_.ndarray] = {}

    def run(sess, item):
        names = {i.name for i in sess.get_inputs()}
        return sess.run(None, {k: v for k, v in item.items() if k in names})[0]

    def score(ref, out, item):
        if metric == "top1_expected":
            e = np_.exp(ref - ref.max(-1, keepdims=True))
            p = e / e.sum(-1, keepdims=True)
            return float(p[np_.arange(len(p)), out.argmax(-1)].mean() * 100.0)
        return float((_pooled(ref, item) * _pooled(out, item)).sum(-1).mean())

    def fn(model, items):
        sess = ort_.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        per = []
        for item in items:
            if id(item) not in reference:
                reference[id(item)] = run(fp32, item)
            per.append(score(reference[id(item)], run(sess, item), item))
        return float(np_.mean(per)), per
    return fn


def nncf_worker(argv: list[str]) -> None:
    """Runs in the NNCF venv: nncf.quantize(model, samples) -> out; prints {"seconds": ...}."""
    ap = argparse.ArgumentParser(prog="peers.py nncf-worker")
    ap.add_argument("model")
    ap.add_argument("samples")
    ap.add_argument("out")
    ap.add_argument("--options", default="{}", help="JSON, keys of NNCF_OPTIONS")
    args = ap.parse_args(argv)
    import logging

    import nncf
    import onnx
    from nncf.quantization.advanced_parameters import (
        AdvancedQuantizationParameters, AdvancedSmoothQuantParameters, OverflowFix, QuantizationParameters)
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    nncf.set_log_level(logging.ERROR)
    opts = json.loads(args.options)
    samples = load_samples(Path(args.samples))
    kwargs: dict = {"subset_size": len(samples)}
    if opts.get("model_type"):
        kwargs["model_type"] = getattr(nncf.ModelType, opts["model_type"])
    if opts.get("preset"):
        kwargs["preset"] = getattr(nncf.QuantizationPreset, opts["preset"])
    adv = AdvancedQuantizationParameters()
    if opts.get("fast_bias_correction_off"):
        adv.disable_bias_correction = True
    if opts.get("overflow_fix_off"):
        adv.overflow_fix = OverflowFix.DISABLE
    if opts.get("act_minmax"):
        adv.activations_range_estimator_params = RangeEstimatorParametersSet.MINMAX
    if opts.get("act_per_tensor"):
        adv.activations_quantization_params = QuantizationParameters(per_channel=False)
    if opts.get("smooth_quant_off"):
        adv.smooth_quant_alphas = AdvancedSmoothQuantParameters(matmul=-1)
    t0 = time.perf_counter()
    model = onnx.load(args.model)
    ac = opts.get("accuracy_control")
    if ac:
        evals = [{k: v[i:i + 1] for k, v in b.items()} for b in load_samples(Path(ac["eval"]))
                 for i in range(len(next(iter(b.values()))))]  # one sample per item: NNCF ranks per item
        q = nncf.quantize_with_accuracy_control(model, nncf.Dataset(samples), nncf.Dataset(evals),
                                                _validation(args.model, ac["metric"]), max_drop=ac["max_drop"],
                                                drop_type=nncf.DropType.ABSOLUTE,
                                                advanced_quantization_parameters=adv, **kwargs)
    else:
        q = nncf.quantize(model, nncf.Dataset(samples), advanced_parameters=adv, **kwargs)
    onnx.save(q, args.out)
    print(json.dumps({"seconds": round(time.perf_counter() - t0, 1), "nncf": nncf.__version__,
                      "samples": len(samples), "options": opts}))


def run_nncf(python: str, fp32: Path, samples: Path, out: Path, options: dict) -> dict:
    cmd = [python, str(HERE), "nncf-worker", str(fp32), str(samples), str(out), "--options", json.dumps(options)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
    out.with_suffix(".log").write_text(proc.stderr)
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(f"NNCF worker failed ({proc.returncode}); log in {out.with_suffix('.log')}:\n"
                           + proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def nncf_for_ort(src: Path, dst: Path) -> dict:
    """The NNCF graph with the same numbers in the form onnxruntime's x86 QDQ fusions accept:
    (1) int8 activation Q/DQ become uint8 with zero point + 128 (the same grid, exactly);
    (2) an activation DQ read by several ops is duplicated, one per consumer;
    (3) a Clip(0, hi) whose only consumer is a per-tensor uint8 Q with zero point 0 and
        255 * scale <= hi (+1e-4 relative) is dropped: the Q saturates at the same bounds.
    NNCF's per-channel activation Q/DQ (the inputs of depthwise convs) stay as they are: no
    onnxruntime kernel takes per-channel activations, so those convs run in FP32."""
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.load(str(src))
    g = m.graph
    consts = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    consts |= {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in g.node
               if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    first = lambda t: np.ravel(consts[t])[0]  # noqa: E731
    to_u8 = duplicated = clips = 0
    for q in list(g.node):
        if q.op_type != "QuantizeLinear" or q.input[0] in consts or len(q.input) < 3 or q.input[2] not in consts:
            continue
        zp = consts[q.input[2]]
        if zp.dtype != np.int8:
            continue
        name = q.output[0] + "_zp_u8"
        g.initializer.append(numpy_helper.from_array((zp.astype(np.int16) + 128).astype(np.uint8), name))
        consts[name] = (zp.astype(np.int16) + 128).astype(np.uint8)
        q.input[2] = name
        for d in consumers.get(q.output[0], []):
            if d.op_type == "DequantizeLinear":
                d.input[2] = name
        for vi in g.value_info:
            if vi.name == q.output[0]:
                vi.type.tensor_type.elem_type = onnx.TensorProto.UINT8
        to_u8 += 1
    nodes = []
    for n in g.node:
        nodes.append(n)
        if n.op_type == "DequantizeLinear" and n.input[0] not in consts and len(consumers.get(n.output[0], [])) > 1:
            for k, c in enumerate(consumers[n.output[0]][1:], 1):
                d = helper.make_node("DequantizeLinear", list(n.input), [f"{n.output[0]}_dup{k}"],
                                     name=f"{n.name}_dup{k}",
                                     **{a.name: helper.get_attribute_value(a) for a in n.attribute})
                nodes.append(d)
                c.input[:] = [d.output[0] if i == n.output[0] else i for i in c.input]
                duplicated += 1
    drop = []
    for n in nodes:
        used = consumers.get(n.output[0], []) if n.op_type == "Clip" else []
        if len(used) != 1 or used[0].op_type != "QuantizeLinear" or len(n.input) < 3:
            continue
        q = used[0]
        if not all(t in consts for t in (n.input[1], n.input[2], q.input[1], q.input[2])):
            continue
        zp, scale = consts[q.input[2]], float(first(q.input[1]))
        if consts[q.input[1]].size > 1:  # per-channel activations: QLinearConv takes a scalar output scale
            continue
        if zp.dtype == np.uint8 and int(first(q.input[2])) == 0 and float(first(n.input[1])) <= 0 \
                and 255 * scale <= float(first(n.input[2])) * (1 + 1e-4):
            q.input[0] = n.input[0]
            drop.append(n)
    nodes = [n for n in nodes if all(n is not d for d in drop)]
    clips = len(drop)
    del g.node[:]
    g.node.extend(nodes)
    onnx.save(m, str(dst))
    return {"activation_q_to_u8": to_u8, "dq_duplicated": duplicated, "clips_dropped": clips}


# ----------------------------------------------------------------------------------- the shared lock

@contextlib.contextmanager
def locked(path: str | None, what: str):
    """Hold an exclusive flock on `path` (the machine's heavy-job lock) for one phase."""
    if not path:
        yield
        return
    with open(path, "a") as f:
        t0 = time.perf_counter()
        fcntl.flock(f, fcntl.LOCK_EX)
        waited = time.perf_counter() - t0
        if waited > 1:
            log(f"waited {waited:.0f} s for {path}")
        t1 = time.perf_counter()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
            log(f"{what}: held the lock {time.perf_counter() - t1:.0f} s")


# ------------------------------------------------------------------------------- building the models

def calibration_samples(spec) -> list[dict]:
    """sqexport's calibration batches split into batch-1 samples; texts lose their padding
    (right-padded: the first attention_mask.sum() tokens are the text)."""
    out = []
    for batch in spec.calib_batches:
        n = len(next(iter(batch.values())))
        for r in range(n):
            if "attention_mask" in batch:
                length = int(batch["attention_mask"][r].sum())
                out.append({k: np.ascontiguousarray(v[r:r + 1, :length]) for k, v in batch.items()})
            else:
                out.append({k: np.ascontiguousarray(v[r:r + 1]) for k, v in batch.items()})
    return out


def build_ort_static_pc(fp32: Path, calib: np.ndarray, name: str, path: Path) -> None:
    """benchmarks/mobilenet.py's quantize_static call (QDQ, min-max), per-channel weights."""
    from mobilenet import _Reader
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

    from _common import quiet

    with quiet():
        quantize_static(str(fp32), str(path), _Reader(calib, name), quant_format=QuantFormat.QDQ,
                        calibrate_method=CalibrationMethod.MinMax, per_channel=True,
                        extra_options={"CalibStridedMinMax": 1})


EXPERIMENTS = {  # --experiments: model -> name -> (settings, changes to the default recipe's stage params)
    "mobilenet-v2": {"sqexport-avx2": ("sqexport defaults with `pair_limit: true` (the pair-limited 8-bit grid: "
                                       "what a host without VNNI builds)", {"quantize.int8": {"pair_limit": True}}),
                     "sqexport-7bit": ("sqexport defaults with `reduce_range: true` (7-bit weights: what a host "
                                       "without VNNI built before the pair-limited grid)",
                                       {"quantize.int8": {"reduce_range": True}})},
    "minilm": {"sqexport-avx2": ("sqexport defaults with `pair_limit: true` (the pair-limited 8-bit grid: what a "
                                 "host without VNNI builds)", {"quantize.int8": {"pair_limit": True}}),
               "sqexport-7bit": ("sqexport defaults with `reduce_range: true` (7-bit weights: what a host without "
                                 "VNNI built before the pair-limited grid)", {"quantize.int8": {"reduce_range": True}}),
               "sqexport-7bit-mean-minmax": ("`reduce_range: true`, `observer: mean-minmax`",
                                             {"quantize.int8": {"reduce_range": True, "observer": "mean-minmax"}}),
               "sqexport-mean-minmax": ("sqexport defaults with `observer: mean-minmax` (NNCF's estimator)",
                                        {"quantize.int8": {"observer": "mean-minmax"}}),
               "sqexport-sq0.95": ("sqexport defaults with SmoothQuant alpha 0.95 (NNCF's)",
                                   {"transform.smoothquant": {"alpha": 0.95}})},
}
NNCF_ORT = {"mobilenet-v2": "nncf", "minilm": "nncf-transformer"}  # --experiments: nncf-ort is made from this
ABLATIONS = ("sqexport-avx2", "sqexport-7bit", "sqexport-7bit-mean-minmax", "sqexport-mean-minmax", "sqexport-sq0.95",
             "nncf-act-per-tensor", "nncf-no-fbc", "nncf-no-overflow-fix", "nncf-act-minmax", "nncf-transformer-no-sq",
             "nncf-transformer-no-fbc", "nncf-transformer-act-minmax")  # fidelity only, not timed


def peer_variants(model: str, ablations: bool) -> dict[str, tuple[str, dict | None]]:
    """name -> (settings, NNCF options or None for an onnxruntime peer)."""
    if model == "mobilenet-v2":
        out = {"ort-static": ("ORT `quantize_static` QDQ, MinMax, per-tensor weights (mobilenet.py `ort-minmax`)", None),
               "ort-static-pc": ("ORT `quantize_static` QDQ, MinMax, `per_channel=True`", None),
               "nncf": ("`nncf.quantize` defaults (PERFORMANCE preset, fast bias correction)", {}),
               "nncf-ac": ("`nncf.quantize_with_accuracy_control`: sqexport's held-out crops, its metric "
                           "(top1_expected) and its gate as max_drop", {"accuracy_control": True})}
        if ablations:
            out |= {"nncf-no-fbc": ("nncf, fast bias correction off", {"fast_bias_correction_off": True}),
                    "nncf-no-overflow-fix": ("nncf, overflow fix off", {"overflow_fix_off": True}),
                    "nncf-act-minmax": ("nncf, activation ranges global min/max", {"act_minmax": True}),
                    "nncf-act-per-tensor": ("nncf, per-tensor activations everywhere (not per-channel at "
                                            "depthwise inputs)", {"act_per_tensor": True})}
        return out
    out = {"ort-dynamic": ("ORT `quantize_dynamic(per_channel=True, weight_type=QInt8)` (minilm.py)", None),
           "nncf": ("`nncf.quantize` defaults (no model_type)", {}),
           "nncf-transformer": ("`nncf.quantize(model_type=TRANSFORMER)`: MIXED preset, SmoothQuant 0.95",
                                {"model_type": "TRANSFORMER"}),
           "nncf-transformer-ac": ("`nncf.quantize_with_accuracy_control(model_type=TRANSFORMER)`: sqexport's held-out "
                                   "texts, mean cosine of pooled embeddings, sqexport's gate as max_drop",
                                   {"model_type": "TRANSFORMER", "accuracy_control": True})}
    if ablations:
        out |= {"nncf-transformer-no-sq": ("nncf-transformer, SmoothQuant off",
                                           {"model_type": "TRANSFORMER", "smooth_quant_off": True}),
                "nncf-transformer-no-fbc": ("nncf-transformer, fast bias correction off",
                                            {"model_type": "TRANSFORMER", "fast_bias_correction_off": True}),
                "nncf-transformer-act-minmax": ("nncf-transformer, activation ranges global min/max",
                                                {"model_type": "TRANSFORMER", "act_minmax": True})}
    return out


def build_model(model: str, work: Path, args) -> dict:
    """sqexport with defaults, then every peer from its baseline.onnx. Returns
    {name: {"path", "settings", "info"}} (fp32 first)."""
    from _common import run_sqexport

    from sqexport.models.zoo import load_model

    out = work / model
    sq = out / "sqexport"
    info: dict = {}
    if not (args.reuse and (sq / "model.onnx").is_file()):
        log(f"{model}: sqexport export {model} (defaults)")
        t0 = time.perf_counter()
        code, report = run_sqexport(model, [], sq)
        info = {"exit_code": code, "seconds": round(time.perf_counter() - t0, 1)}
        (out / "sqexport-run.json").write_text(json.dumps(info))
    else:
        info = json.loads((out / "sqexport-run.json").read_text()) if (out / "sqexport-run.json").is_file() else {}
    report = json.loads((sq / "report.json").read_text())
    stages = "; ".join(f"{s['type']}(" + ", ".join(f"{k}={v}" for k, v in s["params"].items()
                                                   if not isinstance(v, dict)) + ")"
                       for s in report["recipe"]["stages"])
    info |= {"passed": report["passed"], "checks": report["checks"], "recipe": report["recipe"]}
    fp32 = sq / "baseline.onnx"
    variants = {"fp32": {"path": fp32, "settings": "baseline.onnx of the sqexport run", "info": {}},
                "sqexport": {"path": sq / "model.onnx", "settings": f"`sqexport export {model}`: {stages}",
                             "info": info}}
    spec = load_model(model)
    samples = calibration_samples(spec)
    npz = out / "calib.npz"
    save_samples(samples, npz)
    for name, (settings, options) in peer_variants(model, args.ablations).items():
        path = out / f"{name}.onnx"
        entry = {"path": path, "settings": settings, "info": {}}
        if not (args.reuse and path.is_file()):
            log(f"{model}: building {name}")
            t0 = time.perf_counter()
            if options is not None:
                if options.get("accuracy_control"):  # the same data, metric and budget as sqexport's gate
                    evals = out / "eval.npz"
                    save_samples(spec.eval_batches, evals)
                    gate = next(c for c in report["checks"] if c["name"] == "accuracy_drop")
                    metric = "top1_expected" if spec.task == "image-classification" else "cosine"
                    options = {**options, "accuracy_control": {"eval": str(evals), "metric": metric,
                                                               "max_drop": float(gate["limit"])}}
                entry["info"] = run_nncf(args.nncf_python, fp32, npz, path, options)
            elif name == "ort-static":
                from mobilenet import build_ort_static

                calib = np.concatenate([b[spec.input_names[0]] for b in spec.calib_batches])
                build_ort_static(fp32, calib, spec.input_names[0], "minmax", False, path)
            elif name == "ort-static-pc":
                calib = np.concatenate([b[spec.input_names[0]] for b in spec.calib_batches])
                build_ort_static_pc(fp32, calib, spec.input_names[0], path)
            elif name == "ort-dynamic":
                from _common import Variant
                from minilm import build_ort_dynamic

                built = build_ort_dynamic(Variant("fp32", "", fp32), out / "ort-dynamic-build")
                built.path.replace(path)
            entry["info"]["seconds"] = round(time.perf_counter() - t0, 1)
            (out / f"{name}.json").write_text(json.dumps(entry["info"]))
        elif (out / f"{name}.json").is_file():
            entry["info"] = json.loads((out / f"{name}.json").read_text())
        variants[name] = entry
    if args.experiments:
        variants |= build_experiments(model, work, args, variants, report["recipe"])
    variants["fp32"]["info"] = {"calibration_samples": len(samples)}
    return variants


def build_experiments(model: str, work: Path, args, built: dict, recipe: dict) -> dict:
    """nncf-ort (NNCF's graph in onnxruntime's form, nncf_for_ort) and sqexport's default recipe
    with one change (EXPERIMENTS), through the CLI with --recipe."""
    from _common import run_sqexport

    out = work / model
    variants = {}
    path = out / "nncf-ort.onnx"
    if not (args.reuse and path.is_file()):
        info = nncf_for_ort(built[NNCF_ORT[model]]["path"], path)
        (out / "nncf-ort.json").write_text(json.dumps(info))
    info = json.loads((out / "nncf-ort.json").read_text())
    variants["nncf-ort"] = {"path": path, "info": info,
                            "settings": f"`{NNCF_ORT[model]}` in onnxruntime's form: int8 activation Q/DQ as uint8 "
                                        "(zero point + 128), one DQ per consumer, Clip before a uint8 Q dropped"}
    for name, (settings, changes) in EXPERIMENTS[model].items():
        folder = out / name
        if not (args.reuse and (folder / "model.onnx").is_file()):
            r = json.loads(json.dumps(recipe))
            for stage in r["stages"]:
                stage.pop("version", None)
                stage["params"].update(changes.get(stage["type"], {}))
            folder.mkdir(parents=True, exist_ok=True)
            (folder.parent / f"{name}.recipe.yaml").write_text(json.dumps(r, indent=1))
            log(f"{model}: building {name}")
            t0 = time.perf_counter()
            code, _ = run_sqexport(model, ["--recipe", str(folder.parent / f"{name}.recipe.yaml")], folder)
            (out / f"{name}.json").write_text(json.dumps({"exit_code": code,
                                                          "seconds": round(time.perf_counter() - t0, 1)}))
        rep = json.loads((folder / "report.json").read_text())
        variants[name] = {"path": folder / "model.onnx", "settings": settings,
                          "info": json.loads((out / f"{name}.json").read_text())
                          | {"weight_range": rep.get("quantization", {}).get("weight_range")}}
    return variants


# ----------------------------------------------------------------------------------------- structure

WEIGHT_OPS = ("Conv", "Gemm", "MatMul")
INT8_KERNELS = ("QLinearConv", "QGemm", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat",
                "DynamicQuantizeMatMul", "QLinearAdd", "QLinearMul", "QLinearConcat", "QLinearGlobalAveragePool",
                "QLinearAveragePool", "QLinearSoftmax", "QLinearSigmoid", "QLinearLeakyRelu", "QAttention",
                "DynamicQuantizeLinear", "QEmbedLayerNormalization")
FP32_KERNELS = ("Conv", "FusedConv", "Gemm", "MatMul", "FusedMatMul", "Add", "Mul", "Attention",
                "SkipLayerNormalization", "LayerNormalization", "Softmax", "Gelu", "BiasGelu")


def qdq_structure(path: Path) -> dict:
    """Q/DQ of the stored graph: DQ -> consumer op, split weights / activations; weight scheme
    (per-channel or not); activation zero points (uint8/int8, symmetric or not); weight ops with no
    DQ on their weight (left FP32)."""
    import onnx
    from onnx import numpy_helper

    g = onnx.load(str(path)).graph
    consts = {i.name: i for i in g.initializer}
    for n in g.node:
        if n.op_type == "Constant" and n.attribute:
            consts[n.output[0]] = n.attribute[0].t
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def is_weight(t: str) -> bool:
        if t in consts:
            return True
        p = producer.get(t)
        return p is not None and p.op_type in ("QuantizeLinear", "Transpose", "Reshape") and p.input[0] in consts

    def arr(t: str):
        return numpy_helper.to_array(consts[t]) if t in consts else None

    by_consumer: dict[str, dict[str, int]] = {}
    weight_scheme = {"per_channel": 0, "per_tensor": 0, "int8": 0, "uint8": 0, "stored_fp32_then_Q": 0,
                     "int32_bias": 0}
    act_zp = {}
    fed_by_dq: set[str] = set()
    for n in g.node:
        if n.op_type == "DequantizeLinear":
            w = is_weight(n.input[0])
            scale = arr(n.input[1])
            zp = arr(n.input[2]) if len(n.input) > 2 and n.input[2] else None
            x = arr(n.input[0])
            if w and x is not None and x.dtype == np.int32:
                weight_scheme["int32_bias"] += 1
            elif w:
                weight_scheme["per_channel" if scale is not None and scale.size > 1 else "per_tensor"] += 1
                if x is None:
                    weight_scheme["stored_fp32_then_Q"] += 1
                    x = zp
                if x is not None:
                    weight_scheme["int8" if x.dtype == np.int8 else "uint8"] += 1
            else:
                dt = "s8" if zp is not None and zp.dtype == np.int8 else "u8"
                v = int(np.asarray(zp).ravel()[0]) if zp is not None else 0
                key = f"{dt} zp={v}" if v in (0, 128) else f"{dt} zp=other"
                if scale is not None and scale.size > 1:
                    key += " per-channel"
                act_zp[key] = act_zp.get(key, 0) + 1
            kind = "biases" if w and x is not None and x.dtype == np.int32 else "weights" if w else "activations"
            for c in consumers.get(n.output[0], []):
                slot = by_consumer.setdefault(c.op_type, {"weights": 0, "activations": 0, "biases": 0})
                slot[kind] += 1
                fed_by_dq.add(c.name)
    left_fp32 = {}
    for n in g.node:
        if n.op_type in WEIGHT_OPS and n.name not in fed_by_dq and any(is_weight(i) for i in n.input[1:2]):
            left_fp32[n.op_type] = left_fp32.get(n.op_type, 0) + 1
    ops: dict[str, int] = {}
    for n in g.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return {"Q": ops.get("QuantizeLinear", 0), "DQ": ops.get("DequantizeLinear", 0),
            "dq_by_consumer": dict(sorted(by_consumer.items(), key=lambda kv: -kv[1]["weights"] - kv[1]["activations"])),
            "weights": weight_scheme, "activation_zero_points": act_zp, "weight_ops_left_fp32": left_fp32,
            "stored_ops": ops}


def runtime_ops(path: Path) -> dict[str, int]:
    """Op counts of the graph onnxruntime runs (all optimizations, CPU EP), from
    SessionOptions.optimized_model_filepath."""
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = 1
    with tempfile.TemporaryDirectory() as tmp:
        so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        g = onnx.load(so.optimized_model_filepath, load_external_data=False).graph
    counts: dict[str, int] = {}
    for n in g.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


# ------------------------------------------------------------------------------------------ measuring

def fidelity(spec, variants: dict, threads: int) -> dict[str, dict]:
    from sqexport.runtime_check.accuracy import classification_metrics, embedding_metrics, run_session
    from sqexport.runtime_check.session import make_session

    outs = {k: run_session(make_session(v["path"], threads), spec.eval_batches, spec.postprocess)
            for k, v in variants.items()}
    base = outs["fp32"]
    if spec.task == "image-classification":
        return {k: classification_metrics(base, o, None) for k, o in outs.items()}
    return {k: embedding_metrics(base, o) for k, o in outs.items()}


def timing(variants: dict, feed: dict, repeats: int, budget: float, max_iters: int, lock: str | None,
           tag: str) -> dict:
    """`repeats` interleaved 1-thread loops over every model, all under one hold of the lock; per
    model the median over repeats of p50 and of the in-repeat ratio fp32 p50 / p50."""
    from _common import latency_table

    paths = {k: v["path"] for k, v in variants.items() if not v.get("fidelity_only")}
    runs, loads = [], []
    with locked(lock, f"{tag} timing, {repeats} repeats"):
        tables = [latency_table(paths, feed, [1], max_iters, budget, log=log) for _ in range(repeats)]
    for r, (table, others) in enumerate(tables):
        runs.append(table[1])
        loads.append(others[1])
        log(f"{tag} repeat {r + 1}: " + ", ".join(f"{k} {v['p50']:.2f} ms ({v['speedup']:.2f}x)"
                                                   for k, v in table[1].items()))
    out = {}
    for k in paths:
        p50 = [run[k]["p50"] for run in runs]
        sp = [run[k]["speedup"] for run in runs]
        out[k] = {"p50_ms": float(np.median(p50)), "speedup": float(np.median(sp)),
                  "speedup_min": float(min(sp)), "speedup_max": float(max(sp)),
                  "rounds": [run[k]["n"] for run in runs], "p50_per_repeat": p50, "speedup_per_repeat": sp}
    return {"per_model": out, "other_cpu_load_cores": loads}


# ------------------------------------------------------------------------------------------ reporting

def host_info() -> dict:
    from _common import machine_info

    info = machine_info(("onnxruntime", "onnx", "torch"))
    proc = subprocess.run(["grep", "-o", r"avx512_vnni\|avx_vnni", "/proc/cpuinfo"], capture_output=True, text=True)
    info["vnni_flags"] = sorted(set(proc.stdout.split()))
    nncf = subprocess.run([NNCF_PYTHON_USED, "-c", "import nncf, onnxruntime; print(nncf.__version__, onnxruntime.__version__)"],
                          capture_output=True, text=True)
    info["nncf_venv"] = nncf.stdout.strip()
    return info


NNCF_PYTHON_USED = NNCF_PYTHON


def kernel_summary(ops: dict) -> str:
    int8 = {k: v for k, v in ops.items() if k in INT8_KERNELS}
    fp = {k: ops[k] for k in ("Conv", "FusedConv", "Gemm", "MatMul", "FusedMatMul") if k in ops}
    qdq = {k: ops[k] for k in ("QuantizeLinear", "DequantizeLinear") if k in ops}
    fmt = lambda d: " ".join(f"{k} {v}" for k, v in d.items()) or "-"  # noqa: E731
    return f"{fmt(int8)} / {fmt(fp)} / {fmt(qdq)}"


def render_model(model: str, res: dict) -> str:
    from _common import markdown_table

    image = model == "mobilenet-v2"
    headers = ["variant", "p50 ms", "x FP32 (median)", "x FP32 range"]
    headers += ["KL to FP32", "top-1 agree %"] if image else ["mean cos", "min cos"]
    headers += ["size MB", "runtime int8 kernels / FP32 matmul-convs / Q DQ left", "settings"]
    rows = []
    for k, v in res["variants"].items():
        lat = res["timing"]["per_model"].get(k)
        f = res["fidelity"][k]
        row = [k, f"{lat['p50_ms']:.2f}" if lat else "", f"{lat['speedup']:.2f}" if lat else "(not timed)",
               f"{lat['speedup_min']:.2f}-{lat['speedup_max']:.2f}" if lat else ""]
        row += ([f"{f['kl_to_baseline']:.4f}", f"{f['agreement_with_baseline']:.1f}"] if image
                else [f"{f['model']:.4f}", f"{f['min_cosine']:.4f}"])
        row += [f"{v['size_mb']:.2f}", kernel_summary(res["runtime_ops"][k]), v["settings"]]
        rows.append(row)
    return markdown_table(headers, rows)


def render_structure(model: str, res: dict) -> str:
    from _common import markdown_table

    headers = ["variant", "Q / DQ", "DQ -> consumer (weights + activations)", "weights", "activation zero points",
               "weight ops left FP32"]
    rows = []
    for k, s in res["structure"].items():
        if k == "fp32":
            continue
        cons = ", ".join(f"{op} {c['weights']}+{c['activations']}" + (f" (+{c['biases']} bias)" if c["biases"] else "")
                         for op, c in s["dq_by_consumer"].items())
        w = s["weights"]
        ws = (f"{w['per_channel']} per-channel, {w['per_tensor']} per-tensor; {w['int8']} s8, {w['uint8']} u8"
              + (f"; {w['int32_bias']} int32 biases" if w["int32_bias"] else ""))
        rows.append([k, f"{s['Q']} / {s['DQ']}", cons, ws,
                     ", ".join(f"{z} x{n}" for z, n in s["activation_zero_points"].items()) or "-",
                     ", ".join(f"{op} {n}" for op, n in s["weight_ops_left_fp32"].items()) or "-"])
    return markdown_table(headers, rows)


def render(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# Peers: sqexport vs onnxruntime and NNCF on the same baseline.onnx",
        "",
        f"- Host: {m['cpu']}, {m['cpu_count']} logical CPUs; ISA flags {', '.join(m['isa'])}; "
        f"`grep -o 'avx512_vnni\\|avx_vnni' /proc/cpuinfo`: {', '.join(m['vnni_flags']) or 'none (no VNNI)'}; "
        f"onnxruntime {m['onnxruntime']}, onnx {m['versions'].get('onnx')}, torch {m['versions'].get('torch')}; "
        f"NNCF venv: nncf, onnxruntime {m['nncf_venv']}.",
        f"- Commit: `{result['revision']}`; date: {result['date']}.",
        f"- Command: `{result['command']}`; total {result['total_seconds']:.0f} s.",
        "- Speed: batch 1, 1 thread, CPUExecutionProvider with all optimizations, every model of a family "
        f"interleaved round-robin in one loop; {result['repeats']} repeats of up to {result['budget_s']:.0f} s / "
        f"{result['max_iters']} rounds, holding the machine's heavy-job lock; p50 and ratio are medians "
        "over repeats (range: min-max over repeats).",
        "",
    ]
    for model, res in result["models"].items():
        image = model == "mobilenet-v2"
        loads = res["timing"]["other_cpu_load_cores"]
        lines += [
            f"## {model}",
            "",
            f"Calibration: {res['calibration_samples']} samples (sqexport's own calibration split); fidelity on "
            f"{res['eval_samples']} held-out {'crops of 7 other photos' if image else 'corpus texts'}; latency input: "
            f"{'one held-out crop' if image else 'one held-out sentence padded to 128 tokens'}. Other processes used "
            + ", ".join(f"{x:.2f}" if x is not None else "?" for x in loads) + " cores during the repeats.",
            "",
            render_model(model, res),
            "",
            "Structure of the stored graphs (DQ nodes by the op they feed, weights+activations):",
            "",
            render_structure(model, res),
            "",
        ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main

def run_model(model: str, work: Path, args) -> dict:
    from _common import size_of

    from sqexport.models.zoo import load_model

    spec = load_model(model)
    with locked(args.lock, f"{model} build and fidelity"):
        variants = build_model(model, work, args)
        fid = fidelity(spec, variants, 2)
    log(f"{model} fidelity: " + ", ".join(
        f"{k} " + (f"KL {f['kl_to_baseline']:.4f} agree {f['agreement_with_baseline']:.1f}"
                   if "kl_to_baseline" in f else f"cos {f['model']:.4f}") for k, f in fid.items()))
    structure = {k: qdq_structure(v["path"]) for k, v in variants.items()}
    ops = {k: runtime_ops(v["path"]) for k, v in variants.items()}
    timed = {k: v for k, v in variants.items() if k not in ABLATIONS}
    lat = timing(timed, spec.example_inputs, args.repeats, args.budget, args.max_iters, args.lock, model)
    for v in variants.values():
        v["size_mb"] = size_of(v["path"])["mb"]
    return {"variants": {k: {"settings": v["settings"], "path": str(v["path"]), "size_mb": v["size_mb"],
                             "build": v["info"]} for k, v in variants.items()},
            "calibration_samples": variants["fp32"]["info"]["calibration_samples"],
            "eval_samples": sum(len(next(iter(b.values()))) for b in spec.eval_batches),
            "fidelity": fid, "structure": structure, "runtime_ops": ops, "timing": lat}


def main() -> None:
    global NNCF_PYTHON_USED
    if sys.argv[1:2] == ["nncf-worker"]:
        nncf_worker(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--workdir", type=Path, default=None, help="keep the built models here [a temp folder]")
    ap.add_argument("--reuse", action="store_true", help="reuse models already built in --workdir")
    ap.add_argument("--nncf-python", default=NNCF_PYTHON, help=f"python of the NNCF venv [{NNCF_PYTHON}]")
    ap.add_argument("--lock", default=None, help="flock this file around each heavy phase (e.g. /tmp/heavy.lock)")
    ap.add_argument("--repeats", type=int, default=7, help="interleaved timing loops per model [7]")
    ap.add_argument("--budget", type=float, default=20.0, help="seconds per timing loop [20]")
    ap.add_argument("--max-iters", type=int, default=2000, help="rounds per timing loop at most [2000]")
    ap.add_argument("--ablations", action="store_true", help="also NNCF with one choice switched off (fidelity only)")
    ap.add_argument("--experiments", action="store_true",
                    help="also nncf-ort (timed) and sqexport's recipe with one change (fidelity only)")
    ap.add_argument("--no-write", action="store_true", help="print only; do not write results/peers.*")
    args = ap.parse_args()
    NNCF_PYTHON_USED = args.nncf_python
    import onnxruntime as ort

    ort.set_default_logger_severity(3)  # not the optimized-graph and unused-initializer warnings
    sys.path.insert(0, str(HERE.parent))
    from _common import project_revision, write_results

    t0 = time.perf_counter()
    models = [m for m in args.models.split(",") if m]
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        results = {m: run_model(m, work, args) for m in models}
    result = {"revision": project_revision(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "command": "benchmarks/peers.py " + " ".join(sys.argv[1:]), "machine": host_info(),
              "repeats": args.repeats, "budget_s": args.budget, "max_iters": args.max_iters,
              "total_seconds": time.perf_counter() - t0, "models": results}
    md = render(result)
    print(md)
    if not args.no_write and set(models) == set(MODELS):
        json_path, md_path = write_results("peers", json.loads(json.dumps(result, default=str)), md)
        log(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
