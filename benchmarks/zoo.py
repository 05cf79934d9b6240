"""Third-party architectures (timm, random weights with BatchNorm statistics from photo crops):
int8 coverage, speed vs FP32 and vs onnxruntime `quantize_static` of the same baseline, and
fidelity (cosine of logits, top-1 agreement) to FP32, every model of one architecture timed in
one interleaved run.

    .venv/bin/python benchmarks/zoo.py                    # all architectures, ~15-25 min on 2 cores
    .venv/bin/python benchmarks/zoo.py --arch resnet18,deit_tiny --budget 5
    .venv/bin/python benchmarks/zoo.py --arch edgenext_xx_small,coat_lite_tiny --default-gate --results zoo-sweep

Any timm model name works as an architecture (benchmarks._timm resolves it); `--default-gate` runs
sqexport with its own accuracy gate, as a user's first run would.

sqexport runs as a user would: `sqexport benchmarks._timm:ARCH --input-shape 1x3x224x224
--prune none --calib-data calib.npy --eval-data eval.npy` (calibration crops of 10 photos,
evaluation crops of 7 other photos) with a loose gate, so the tables show int8 as built, not
what the accuracy fallback would keep in FP32.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import latency_table, machine_info, markdown_table, project_revision, run_sqexport, write_results  # noqa: E402
from benchmarks._timm import ARCHITECTURES, calibration_crops, evaluation_crops  # noqa: E402
from benchmarks.mobilenet import build_ort_static  # noqa: E402
from sqexport.runtime_check.session import make_session  # noqa: E402


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _logits(path: Path, x: np.ndarray) -> np.ndarray:
    s = make_session(path, 2)
    name = s.get_inputs()[0].name
    return np.concatenate([s.run(None, {name: x[i:i + 8]})[0] for i in range(0, len(x), 8)])


def fidelity(base: np.ndarray, out: np.ndarray) -> dict:
    cos = (base * out).sum(1) / (np.linalg.norm(base, axis=1) * np.linalg.norm(out, axis=1))
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
            "top1_agreement": float((base.argmax(1) == out.argmax(1)).mean() * 100)}


def bench_arch(arch: str, work: Path, calib: Path, evals: Path, budget: float, default_gate: bool = False) -> dict:
    out = work / arch
    t0 = time.perf_counter()
    gate = [] if default_gate else ["--max-accuracy-drop", "100"]
    code, rep = run_sqexport(f"benchmarks._timm:{arch}", ["--input-shape", "1x3x224x224", "--prune", "none",
                                                          "--calib-data", str(calib), "--eval-data", str(evals),
                                                          *gate, "--quiet"], out)
    seconds = time.perf_counter() - t0
    paths = {"fp32": out / "baseline.onnx", "sqexport": out / "model.onnx", "ort_static": work / f"{arch}-ort.onnx"}
    x_cal = np.load(calib)
    build_ort_static(paths["fp32"], x_cal, make_session(paths["fp32"], 1).get_inputs()[0].name, "minmax", False,
                     paths["ort_static"])
    x = np.load(evals)
    base = _logits(paths["fp32"], x)
    fid = {k: fidelity(base, _logits(p, x)) for k, p in paths.items() if k != "fp32"}
    feed = {make_session(paths["fp32"], 1).get_inputs()[0].name: x[:1]}
    lat, others = latency_table(paths, feed, [1], max_iters=200, budget_s=budget, log=log)
    cov = rep["quantization"]["coverage"]
    return {"arch": arch, "timm": ARCHITECTURES.get(arch, arch), "exit": code, "sqexport_seconds": round(seconds, 1),
            "coverage": {"int8": cov["int8"], "weight_layers": cov["weight_layers"], "fp32": cov["fp32"]},
            "ranges": (rep["quantization"].get("range_choice") or {}).get("chosen", "?"),
            "fidelity": fid, "latency_ms": lat[1], "other_cpu_load_cores": others[1]}


def render(rows: list[dict]) -> str:
    headers = ["arch", "int8 / weight layers", "ranges", "x FP32", "x ORT static", "ORT static x FP32",
               "cos sqexport", "cos ORT", "top-1 agree sqexport %", "top-1 agree ORT %", "exit"]
    table = []
    for r in rows:
        lat = r["latency_ms"]
        table.append([r["arch"], f"{r['coverage']['int8']} / {r['coverage']['weight_layers']}", r.get("ranges", "?"),
                      f"{lat['sqexport']['speedup']:.2f}", f"{lat['ort_static']['p50'] / lat['sqexport']['p50']:.2f}",
                      f"{lat['ort_static']['speedup']:.2f}",
                      f"{r['fidelity']['sqexport']['cosine_mean']:.4f}", f"{r['fidelity']['ort_static']['cosine_mean']:.4f}",
                      f"{r['fidelity']['sqexport']['top1_agreement']:.1f}",
                      f"{r['fidelity']['ort_static']['top1_agreement']:.1f}", r["exit"]])
    return markdown_table(headers, table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default=",".join(a for a in ARCHITECTURES if a != "tf_efficientnet_lite0"))
    ap.add_argument("--budget", type=float, default=10.0, help="seconds of interleaved timing per architecture")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--default-gate", action="store_true", help="sqexport's own accuracy gate instead of a loose one")
    ap.add_argument("--results", default="zoo", help="name of the results file in benchmarks/results/")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        calib, evals = work / "calib.npy", work / "eval.npy"
        np.save(calib, calibration_crops(8))
        np.save(evals, evaluation_crops(8))
        rows = []
        for arch in args.arch.split(","):
            log(f"== {arch}")
            rows.append(bench_arch(arch, work, calib, evals, args.budget, args.default_gate))
            log(render(rows[-1:]))
    md = render(rows)
    print(md)
    info = machine_info()
    header = (f"# Third-party zoo: sqexport int8 vs onnxruntime quantize_static ({info['cpu']}, "
              f"{', '.join(info['isa'])}; onnxruntime {info['onnxruntime']})\n\n"
              f"revision {project_revision()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; 1 thread, batch 1, "
              "p50 of interleaved rounds; speed ratios from the same run. Random weights (seed 0), BatchNorm "
              "statistics from 40 photo crops; fidelity on 56 crops of 7 held-out photos against FP32; "
              f"{'the default accuracy gate' if args.default_gate else 'a loose gate (100 points)'}.\n\n")
    write_results(args.results, {"machine": info, "revision": project_revision(), "rows": rows}, header + md)


if __name__ == "__main__":
    main()
