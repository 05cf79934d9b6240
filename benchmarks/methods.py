"""Every pruning method at equal kept-parameter budgets: accuracy/fidelity, size and speed, next to
onnxruntime's own int8 quantizers of the same FP32 model, in one run per model.

Per model (mnist-resnet, mobilenet-v2, minilm), every variant is `sqexport MODEL --prune METHOD ...`
through the CLI (in-process, gates at their defaults: exit 1 still writes the model and is
recorded), with each method's own default recovery:

  fp32             baseline.onnx of the unmodified model (the reference for every ratio)
  ort-dynamic      onnxruntime quantize_dynamic(per_channel=True, QInt8) of baseline.onnx
  ort-static       onnxruntime quantize_static(QDQ, per_channel=True; reduce_range without VNNI)
  none             `--prune none`: sqexport int8 alone
  magnitude-kK     `--prune magnitude --sparsity 1-K` (unstructured zeros: size, not speed)
  nm-kK            `--prune nm --nm N:M` with N/M = K (2:4, 1:4; zeros: size, not speed)
  structured-kK    `--prune structured --sparsity S`, S (a fraction of channels / heads / neurons)
                   chosen so that about K of the prunable weights stay: S = 1 - K^(1/a), a = 2
                   for CNNs, 1 for transformers, refitted once from the first run's kept fraction
  sensitivity-kK   `--prune sensitivity --sparsity 1-K` (PFP channels; rounding to multiples of
                   8 lands off the budget)
  pqi              `--prune pqi` (SAP chooses its own sparsity: one run, at whatever it reaches)
  lowrank          `--prune lowrank` (ranks by energy 0.6: one run, at whatever it keeps)

K = the budget, the kept fraction of prunable weights: 0.5 (and 0.25 without --quick). "kept"
in the table is what the run actually kept (1 - report.json sparsity.overall: nonzero weights of
the prunable layers, factors included, over the dense count).

Metric: the model's own, computed here the same way for every variant (benchmarks/structured.py):
top-1 on mnist-resnet's 10k test split, top-1 agreement with FP32 and KL(FP32 || model) for
mobilenet-v2, mean cosine of pooled embeddings for MiniLM. Latency: the model's example input,
every variant of a model interleaved in one run, at 1 thread and at all cores; ratios are FP32
p50 / variant p50, and "vs none" = int8-alone p50 / variant p50. Sizes: model.onnx raw and zipped.

    .venv/bin/python benchmarks/methods.py [--quick] [--models mnist-resnet,mobilenet-v2,minilm]
                                           [--workdir DIR [--reuse]] [--max-wait S]

`--quick`: mnist-resnet at one budget (0.5); `--budgets 0.5,0.3` chooses others. Results are merged by model into
benchmarks/results/methods[-quick].json / .md (a run of one model keeps the others' results),
and the Pareto plot is benchmarks/results/methods[-quick].png.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _budget import channel_sparsity_for, fitted_exponent, nm_for  # noqa: E402
from _common import (  # noqa: E402
    RESULTS_DIR, Variant,
    latency_table, machine_info, markdown_table, project_revision, run_sqexport, size_of, thread_settings,
    write_results,
)
from _pareto import plot_pareto  # noqa: E402
from structured import metric, peers  # noqa: E402

MODELS = ("mnist-resnet", "mobilenet-v2", "minilm")
EXTRA_MODELS = ("digits-cnn",)  # tiny: a fast check of the script (and of issue 11's digits-cnn runs)
BUDGETS, QUICK_BUDGETS = (0.5, 0.25), (0.5,)
BUDGET_METHODS = ("magnitude", "nm", "structured", "sensitivity")  # run once per budget
OWN_SPARSITY = ("pqi", "lowrank")  # choose their own kept fraction: one run each
SPEED_NOTE = {"magnitude": "zeros: size only", "nm": "zeros: size only", "pqi": "zeros: size only",
              "structured": "channels removed: speed", "sensitivity": "PFP channels removed: speed",
              "lowrank": "smaller factors: speed", "none": "int8 alone"}
REUSE = False  # --reuse: measure only the models already built in --workdir (the rest are listed as not built)
BUDGET_TOLERANCE = 0.02  # structured: refit the channel fraction once when further off than this


def log(msg: str) -> None:
    print(f"[methods] {msg}", file=sys.stderr, flush=True)


def build(model: str, method: str, name: str, flags: list[str], workdir: Path, budget: float | None,
          failures: dict) -> Variant | None:
    """One sqexport run; None (and the error in `failures`) when it exits with neither 0 nor 1 or
    raises (a method that does not apply to the model), so the other variants are still compared."""
    t0, out = time.perf_counter(), workdir / model / name
    try:
        if REUSE:
            if not (out / "report.json").is_file() or not (out / "model.onnx").is_file():
                raise FileNotFoundError(f"not built in --workdir ({out}); run without --reuse to build it")
            log(f"{model}: reusing {out} (--reuse)")
            report = json.loads((out / "report.json").read_text())
            exit_code = 0 if report["passed"] else 1  # what the CLI exits with: 1 = a gate failed
        else:
            log(f"{model}: sqexport {model} {' '.join(flags)}")
            exit_code, report = run_sqexport(model, [*flags, "-q"], out)
    except Exception as e:  # noqa: BLE001  recorded in the results, never silent
        failures[name] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300] if str(e).strip() else ''}"
        log(f"{model}: {name} failed: {failures[name]}")
        return None
    kept = 1.0 - report["sparsity"]["overall"]
    structure = report.get("structure") or {}
    info = {"method": method, "budget": budget, "kept": kept, "exit_code": exit_code,
            "command": f"sqexport {model} {' '.join(flags)}", "macs_ratio": (structure.get("macs") or {}).get("ratio"),
            "pipeline_accuracy": {k: report["accuracy"].get(k) for k in ("metric", "baseline", "model", "drop")},
            "recovery": {k: (report.get("recovery") or {}).get(k) for k in ("steps", "metric_before", "metric_after")},
            # the pipeline's own stage times (also right for a --reuse'd model)
            "build_seconds": round(sum(st.get("seconds") or 0.0 for st in report.get("stages", [])), 1),
            "build_cpu_seconds": round(sum(st.get("cpu_seconds") or 0.0 for st in report.get("stages", [])), 1)}
    log(f"{model}: {name} kept {kept:.3f}, exit {exit_code}, built in {info['build_seconds']} s "
        f"({info['build_cpu_seconds']} CPU s){' earlier' if REUSE else ''} ({time.perf_counter() - t0:.0f} s now)")
    return Variant(name, info["command"], out / "model.onnx", info)


def structured_variant(model: str, budget: float, exponent: float, workdir: Path, failures: dict) -> Variant | None:
    """`--prune structured` at the channel fraction expected to keep `budget` of the weights; one
    refit of the exponent from the first run when it lands more than BUDGET_TOLERANCE off."""
    name = f"structured-k{budget:g}"
    s = round(channel_sparsity_for(budget, exponent), 3)
    v = build(model, "structured", f"{name}-s{s:g}", ["--prune", "structured", "--sparsity", str(s)], workdir, budget,
              failures)
    if v is None:
        return None
    v.name = name
    refit = fitted_exponent(s, v.info["kept"])
    if abs(v.info["kept"] - budget) > BUDGET_TOLERANCE and refit:
        s2 = round(channel_sparsity_for(budget, refit), 3)
        if 0 < s2 < 0.95 and s2 != s:
            first = {"channel_sparsity": s, "kept": v.info["kept"]}
            v2 = build(model, "structured", f"{name}-s{s2:g}", ["--prune", "structured", "--sparsity", str(s2)],
                       workdir, budget, failures)
            if v2 is not None and abs(v2.info["kept"] - budget) < abs(v.info["kept"] - budget):
                v2.name, v2.info["first_try"] = name, first
                v = v2
    return v


def build_variants(model: str, budgets: tuple[float, ...], workdir: Path, transformer: bool,
                   failures: dict) -> list[Variant]:
    """int8 alone first (its folder holds baseline.onnx), then every method at every budget."""
    variants = [build(model, "none", "none", ["--prune", "none"], workdir, None, failures)]
    if variants[0] is None:
        raise RuntimeError(f"{model}: `sqexport {model} --prune none` failed: {failures['none']}")
    for budget in budgets:
        k = f"k{budget:g}"
        variants.append(build(model, "magnitude", f"magnitude-{k}",
                              ["--prune", "magnitude", "--sparsity", f"{1 - budget:g}"], workdir, budget, failures))
        nm = nm_for(budget)
        if nm:
            variants.append(build(model, "nm", f"nm-{nm[0]}:{nm[1]}", ["--prune", "nm", "--nm", f"{nm[0]}:{nm[1]}"],
                                  workdir, budget, failures))
        variants.append(structured_variant(model, budget, 1.0 if transformer else 2.0, workdir, failures))
        variants.append(build(model, "sensitivity", f"sensitivity-{k}",
                              ["--prune", "sensitivity", "--sparsity", f"{1 - budget:g}"], workdir, budget, failures))
    for method in OWN_SPARSITY:
        variants.append(build(model, method, method, ["--prune", method], workdir, None, failures))
    return [v for v in variants if v is not None]


def bench_model(model: str, budgets: tuple[float, ...], workdir: Path, args) -> dict:
    from sqexport.models.zoo import load_model
    from sqexport.runtime_check.accuracy import run_session
    from sqexport.runtime_check.session import make_session

    log(f"{model}: loading")
    spec = load_model(model)
    failures = {}
    built = build_variants(model, budgets, workdir, spec.task != "image-classification", failures)
    fp32 = built[0].path.parent / "baseline.onnx"
    variants = [Variant("fp32", "baseline.onnx", fp32, {"method": "fp32"})]
    variants += [Variant(p.name, p.settings, p.path, {"method": p.name}) for p in peers(spec, fp32, workdir)]
    variants += built
    base_out = run_session(make_session(fp32), spec.eval_batches, spec.postprocess)
    metrics = {v.name: metric(spec, base_out, v.path) for v in variants}
    lat, others = latency_table({v.name: v.path for v in variants}, spec.example_inputs, thread_settings(),
                                args.max_iters, args.budget, max_wait_s=args.max_wait, log=log)
    for t in lat:  # the Done-when comparison: each method against sqexport's int8 alone, same run
        for stats in lat[t].values():
            stats["vs_none"] = lat[t]["none"]["p50"] / stats["p50"]
    return {"variants": [{"name": v.name, "settings": v.settings, "size": size_of(v.path), "metric": metrics[v.name],
                          "latency": {t: lat[t][v.name] for t in lat}, **v.info} for v in variants],
            "budgets": list(budgets), "failures": failures, "other_cpu_cores": others, "load_average": os.getloadavg(),
            "revision": project_revision(), "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _budget_cell(v: dict) -> str:
    if v.get("budget") is None:
        return "own choice" if v["method"] in OWN_SPARSITY else ""
    return f"{v['budget']:.2f}"


def _classifier(m: dict) -> bool:
    return m["metric"].startswith("top1")


def _metric_cell(m: dict) -> str:
    if m["metric"] == "top1_agreement":
        return f"{m['value']:.2f}% agree, KL {m['kl_to_baseline']:.4f}"
    if m["metric"] == "top1_expected":
        return f"{m['value']:.2f}% expected, KL {m['kl_to_baseline']:.4f}"
    return f"{m['value']:.2f}%" if _classifier(m) else f"{m['value']:.4f}"


def table(model: str, result: dict) -> str:
    threads = sorted({int(t) for v in result["variants"] for t in v["latency"]})
    headers = (["variant", "method", "budget (kept)", "kept reached", "metric", "drop"]
               + [f"vs FP32 @{t} thr" for t in threads] + ["vs int8 alone @1 thr", "size MB (zip)", "exit", "note"])
    rows = []
    for v in result["variants"]:
        lat, m = {int(t): s for t, s in v["latency"].items()}, v["metric"]
        kept = f"{v['kept']:.3f}" if "kept" in v else ""
        rows.append([v["name"], v["method"], _budget_cell(v), kept, _metric_cell(m), f"{m['drop']:.2f}"
                     if _classifier(m) else f"{m['drop']:.4f}"]
                    + [f"{lat[t]['speedup']:.2f}x ({lat[t]['p50']:.2f} ms)" for t in threads]
                    + [f"{lat[1]['vs_none']:.2f}x",
                       f"{v['size']['mb']:.3f} ({v['size']['zipped_mb']:.3f})", v.get("exit_code", ""),
                       SPEED_NOTE.get(v["method"], "peer int8" if v["method"].startswith("ort") else "reference")])
    others = ", ".join(f"{t} thr: {c:.2f} cores" for t, c in result["other_cpu_cores"].items() if c is not None)
    load = ", ".join(f"{x:.1f}" for x in result["load_average"])
    failed = "".join(f"\n\nNot built: `{n}`: {why}" for n, why in result.get("failures", {}).items())
    return (markdown_table(headers, rows) + failed + f"\n\nOther processes used {others or 'n/a'} during the latency runs "
            f"(load average {load}); revision {result['revision']}, {result['measured_at']}.")


def pareto_points(result: dict) -> tuple[str, list[dict]]:
    points = []
    for v in result["variants"]:
        lat = {int(t): s for t, s in v["latency"].items()}
        label = f"k{v['budget']:g}" if v.get("budget") is not None else ""
        points.append({"method": v["method"], "label": label, "speedup": lat[1]["speedup"],
                       "metric": v["metric"]["value"]})
    m = result["variants"][0]["metric"]
    ylabel = {"top1": "top-1 (%)", "top1_agreement": "top-1 agreement with FP32 (%)",
              "top1_expected": "top-1 FP32 expects (%)"}.get(m["metric"], m["metric"])
    return ylabel, points


def merged(name: str, results: dict) -> dict:
    """Earlier results of other models (a run of one model keeps the rest)."""
    path = RESULTS_DIR / f"{name}.json"
    old = json.loads(path.read_text())["results"] if path.is_file() else {}
    return {**{m: r for m, r in old.items() if m not in results}, **results}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="mnist-resnet at the 0.5 budget only")
    ap.add_argument("--models", default=None, help=f"comma-separated subset of {','.join(MODELS)}")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--max-iters", type=int, default=400)
    ap.add_argument("--budget", type=float, default=None, help="latency seconds per thread setting [10 quick, 20]")
    ap.add_argument("--max-wait", type=float, default=60.0,
                    help="seconds to wait for a quiet machine before each latency run (0 = do not wait)")
    ap.add_argument("--budgets", default=None, help="comma-separated kept fractions [0.5,0.25; 0.5 with --quick]")
    ap.add_argument("--reuse", action="store_true",
                    help="measure the models already built in --workdir again (nothing is built; missing ones are listed)")
    args = ap.parse_args()
    global REUSE
    REUSE = args.reuse
    budgets = QUICK_BUDGETS if args.quick else BUDGETS
    if args.budgets:
        budgets = tuple(float(b) for b in args.budgets.split(","))
        if not all(0 < b < 1 for b in budgets):
            ap.error(f"--budgets are kept fractions in (0, 1), got {args.budgets}")
    args.budget = args.budget or (10.0 if args.quick else 20.0)
    models = args.models.split(",") if args.models else (["mnist-resnet"] if args.quick else list(MODELS))
    if unknown := [m for m in models if m not in MODELS + EXTRA_MODELS]:
        ap.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS + EXTRA_MODELS)}")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="sqexport-methods-"))
    name = "methods-quick" if args.quick else "methods"
    results = {m: bench_model(m, budgets, workdir, args) for m in models}
    results = merged(name, results)
    results = {m: results[m] for m in MODELS + EXTRA_MODELS if m in results}
    md = "\n\n".join(f"### {m}\n\n" + table(m, r) for m, r in results.items())
    write_results(name, {"machine": machine_info(), "results": results}, md)
    plot_pareto({m: pareto_points(r) for m, r in results.items()}, RESULTS_DIR / f"{name}.png")
    print(md)
    log(f"wrote {RESULTS_DIR / name}.json / .md / .png (models built under {workdir})")


if __name__ == "__main__":
    main()
