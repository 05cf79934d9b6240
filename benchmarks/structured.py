"""Where structure pays: structured pruning (with and without recovery) x int8 mode, next to
onnxruntime's own quantizers of the same FP32 model, in one run per model.

Per model (mnist-resnet, mobilenet-v2, minilm):

  fp32              baseline.onnx of the unmodified model (the reference for every ratio)
  ort-dynamic       onnxruntime.quantization.quantize_dynamic(fp32, per_channel=True, QInt8 weights)
  ort-static        onnxruntime.quantization.quantize_static(fp32, QDQ, per_channel=True,
                    calibrated on the model's calibration split; reduce_range on x86 without VNNI)
  sq-s{S}[-rec]-{Q} `sqexport MODEL --prune structured --sparsity S [--recover] --quant Q`
                    (S = 0 means `--prune none`)

Metric: the model's own (top-1 on the labelled eval split, mean cosine of pooled embeddings for
MiniLM) computed here the same way for every variant. Latency: the model's example input, every
variant of a model interleaved in one run, at 1 thread and at all cores; speedup = FP32 p50 /
variant p50 (medians). Size: model file, raw and zipped.

    .venv/bin/python benchmarks/structured.py [--quick] [--models mnist-resnet,minilm] [--workdir DIR]
                                              [--recover-minutes M]

`--quick` (about 10-15 minutes on 2 cores): mnist-resnet (0 / 0.5, recovery at 0.5, int8) and
MiniLM (0 / 0.5 without recovery, int8-dynamic and int8), with the onnxruntime peers. Writes
benchmarks/results/structured[-quick].json / .md and prints the table.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import (  # noqa: E402
    Variant,
    latency_table, machine_info, markdown_table, project_revision, quiet, run_sqexport, size_of, thread_settings,
    write_results,
)

FULL = {m: [(s, rec, q) for s in (0.0, 0.25, 0.5) for rec in ((False,) if s == 0 else (False, True))
            for q in ("int8", "int8-dynamic")] for m in ("mnist-resnet", "mobilenet-v2", "minilm")}
QUICK = {"mnist-resnet": [(0.0, False, "int8"), (0.5, False, "int8"), (0.5, True, "int8")],
         "minilm": [(0.0, False, "int8"), (0.0, False, "int8-dynamic"), (0.5, False, "int8-dynamic")]}


def log(msg: str) -> None:
    print(f"[structured] {msg}", file=sys.stderr, flush=True)


def sqexport_variant(model: str, sparsity: float, recover: bool, quant: str, workdir: Path,
                     recover_minutes: float) -> Variant:
    name = f"sq-s{sparsity:g}{'-rec' if recover else ''}-{quant}"
    prune = ["--prune", "none"] if sparsity == 0 else ["--prune", "structured", "--sparsity", str(sparsity)]
    flags = [*prune, *(["--recover", "--recover-minutes", str(recover_minutes)] if recover else []),
             "--quant", quant, "--max-accuracy-drop", "100"]  # gates are not the point here
    out = workdir / model / name
    _, report = run_sqexport(model, [*flags, "-q"], out)
    info = {"command": f"sqexport {model} {' '.join(flags)}", "macs_ratio": (report.get("structure") or {})
            .get("macs", {}).get("ratio"), "recovery": {k: (report.get("recovery") or {}).get(k)
                                                         for k in ("steps", "metric_before", "metric_after")}}
    return Variant(name, info["command"], out / "model.onnx", info)


def peers(spec, fp32: Path, workdir: Path) -> list[Variant]:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, \
        quantize_static

    from sqexport.runtime_check.isa import int8_saturates

    out = workdir / spec.name
    dyn = out / "ort-dynamic.onnx"
    with quiet():
        quantize_dynamic(fp32, dyn, per_channel=True, weight_type=QuantType.QInt8)
    variants = [Variant("ort-dynamic", "ORT quantize_dynamic(per_channel=True, QInt8)", dyn)]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(spec.calib_batches)

        def get_next(self):
            batch = next(self.items, None)
            return None if batch is None else {k: v for k, v in batch.items() if k in spec.input_names}

    static = out / "ort-static.onnx"
    reduce = int8_saturates()  # the ORT peer takes its reduce_range where its kernels would saturate
    with quiet():
        quantize_static(fp32, static, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=reduce)
    return variants + [Variant("ort-static", f"ORT quantize_static(QDQ, per_channel=True, reduce_range={reduce})",
                               static)]


def metric(spec, base_out, path: Path) -> dict:
    from sqexport.contracts.tasks import get_task
    from sqexport.runtime_check.accuracy import run_session, task_metrics
    from sqexport.runtime_check.session import make_session

    out = run_session(make_session(path), spec.eval_batches, spec.postprocess)
    m = task_metrics(get_task(spec.task), base_out, out, spec.eval_labels)
    # agreement with FP32's argmax and KL(FP32 || model) exist for classifiers only
    extra = {k: m[k] for k in ("agreement_with_baseline", "kl_to_baseline") if k in m}
    return {"metric": m["metric"], "value": m["model"], "drop": m["drop"], "unit": m.get("unit"), **extra}


def bench_model(model: str, grid: list, workdir: Path, args) -> dict:
    from sqexport.models.zoo import load_model
    from sqexport.runtime_check.accuracy import run_session
    from sqexport.runtime_check.session import make_session

    log(f"{model}: loading")
    spec = load_model(model)
    variants = []
    for s, rec, q in grid:
        log(f"{model}: building s={s} recover={rec} {q}")
        t0 = time.perf_counter()
        variants.append(sqexport_variant(model, s, rec, q, workdir, args.recover_minutes))
        variants[-1].info["build_seconds"] = round(time.perf_counter() - t0, 1)
    fp32 = variants[0].path.parent / "baseline.onnx"
    variants = [Variant("fp32", "baseline.onnx", fp32)] + peers(spec, fp32, workdir) + variants
    base_out = run_session(make_session(fp32), spec.eval_batches, spec.postprocess)
    metrics = {v.name: metric(spec, base_out, v.path) for v in variants}
    lat, others = latency_table({v.name: v.path for v in variants}, spec.example_inputs, thread_settings(),
                                args.max_iters, args.budget, log=log)
    return {"variants": [{"name": v.name, "settings": v.settings, "size": size_of(v.path), "metric": metrics[v.name],
                          "latency": {t: lat[t][v.name] for t in lat}, **v.info} for v in variants],
            "other_cpu_cores": others}


def table(model: str, result: dict) -> str:
    threads = sorted({int(t) for v in result["variants"] for t in v["latency"]})
    headers = ["variant", "model"] + [f"p50 ratio @{t} thr" for t in threads] + ["size MB (zip)", "metric", "drop"]
    rows = []
    for v in result["variants"]:
        m = v["metric"]
        rows.append([v["name"], model] + [f"{v['latency'][t]['speedup']:.2f}x ({v['latency'][t]['p50']:.2f} ms)"
                                          for t in threads]
                    + [f"{v['size']['mb']:.2f} ({v['size']['zipped_mb']:.2f})", f"{m['value']:.4f} {m['unit'] or ''}",
                       f"{m['drop']:.4f}"])
    return markdown_table(headers, rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--models", default=None, help="comma-separated subset of the grid's models")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--recover-minutes", type=float, default=None, help="[2 with --quick, else 10]")
    ap.add_argument("--max-iters", type=int, default=400)
    ap.add_argument("--budget", type=float, default=None, help="seconds per thread setting [10 quick, 20]")
    args = ap.parse_args()
    grid = QUICK if args.quick else FULL
    args.recover_minutes = args.recover_minutes or (2.0 if args.quick else 10.0)
    args.budget = args.budget or (10.0 if args.quick else 20.0)
    models = args.models.split(",") if args.models else list(grid)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="sqexport-structured-"))
    results, parts = {}, []
    for model in models:
        results[model] = bench_model(model, grid[model], workdir, args)
        parts.append(f"### {model}\n\n" + table(model, results[model]))
    data = {"machine": machine_info(), "revision": project_revision(), "quick": args.quick,
            "recover_minutes": args.recover_minutes, "results": results}
    md = "\n\n".join(parts)
    name = "structured-quick" if args.quick else "structured"
    json_path, _ = write_results(name, data, md)
    print(md)
    log(f"wrote {json_path}")


if __name__ == "__main__":
    main()
