"""`sqexport sweep` wall time: the same sweep with 1 worker (jobs one after another, in process)
and with 2 worker processes, each run as a user runs it (the CLI in a child process, a fresh ROOT).

    .venv/bin/python benchmarks/sweep.py                # 8 tiny jobs, then 4 mnist-resnet jobs
    .venv/bin/python benchmarks/sweep.py --sets tiny --repeat 2   # twice each, the faster run counts

Prints a Markdown table (set, workers, wall seconds, ratio) with the machine's CPU flags and load;
writes results/sweep.json and results/sweep.md. A worker process pays its own interpreter + torch
import (seconds) per job, so the tiny set shows that overhead and the resnet set the parallelism;
every job's model.onnx is checked to be byte-identical across the two runs.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import PROJECT_ROOT, machine_info, markdown_table, other_cpu_load, project_revision, write_results  # noqa: E402

TINY = [
    ("cnn-mag50", "digits-cnn", {"prune": "magnitude", "sparsity": 0.5}),
    ("cnn-mag25", "digits-cnn", {"prune": "magnitude", "sparsity": 0.25}),
    ("cnn-nm", "digits-cnn", {"prune": "nm", "nm": "2:4"}),
    ("cnn-dyn", "digits-cnn", {"prune": "none", "quant": "int8-dynamic"}),
    ("mlp-none", "digits-mlp", {"prune": "none"}),
    ("mlp-mag50", "digits-mlp", {"prune": "magnitude", "sparsity": 0.5}),
    ("mlp-struct", "digits-mlp", {"prune": "structured", "sparsity": 0.25}),
    ("mlp-dyn", "digits-mlp", {"prune": "none", "quant": "int8-dynamic"}),
]
# jobs of tens of seconds, where the per-job process start-up is a small share
RESNET = [
    ("resnet-int8", "mnist-resnet", {"prune": "none"}),
    ("resnet-dyn", "mnist-resnet", {"prune": "none", "quant": "int8-dynamic"}),
    ("resnet-struct25", "mnist-resnet", {"prune": "structured", "sparsity": 0.25}),
    ("resnet-mag50", "mnist-resnet", {"prune": "magnitude", "sparsity": 0.5}),
]
SETS = {"tiny": TINY, "resnet": RESNET}


def log(msg: str) -> None:
    print(f"[sweep] {msg}", file=sys.stderr, flush=True)


def sweep_yaml(jobs) -> str:
    lines = ["jobs:"]
    for name, model, opts in jobs:
        extra = "".join(f", {k}: {v if not isinstance(v, str) else repr(v)}" for k, v in opts.items())
        lines.append(f"  - {{name: {name}, model: {model}{extra}}}")
    return "\n".join(lines) + "\n"


def run(sweep: Path, root: Path, workers: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    cmd = [sys.executable, "-c", "from toolchain.cli import main; main()", "sweep", str(sweep), "-o", str(root),
           "--workers", str(workers), "-q"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - t0
    if proc.returncode not in (0, 1):
        raise SystemExit(f"sweep failed ({proc.returncode}): {proc.stderr.strip()[-400:]}")
    return wall


def digests(root: Path, jobs) -> dict[str, str]:
    return {name: hashlib.sha256((root / name / "model.onnx").read_bytes()).hexdigest() for name, _, _ in jobs}


def measure(jobs, repeat: int, tmp: Path) -> dict:
    """Wall time of the sweep at 1 and 2 workers (best of `repeat`), and whether the bytes agree."""
    sweep = tmp / "sweep.yaml"
    sweep.write_text(sweep_yaml(jobs))
    results, hashes = {}, {}
    for workers in (1, 2):
        best, load = None, None
        for r in range(repeat):
            root = tmp / f"w{workers}-{r}"
            wall, other = other_cpu_load(lambda: run(sweep, root, workers))
            log(f"{len(jobs)} jobs, {workers} worker(s), run {r + 1}: {wall:.1f} s "
                f"(other load {other if other is None else round(other, 2)} cores)")
            hashes.setdefault(workers, digests(root, jobs))
            if best is None or wall < best:
                best, load = wall, other
        results[workers] = {"wall_s": round(best, 2), "other_cpu_load_cores": load and round(load, 2)}
    return {"jobs": [{"name": n, "model": m, **o} for n, m, o in jobs], "results": results,
            "speedup_2_vs_1": round(results[1]["wall_s"] / results[2]["wall_s"], 3),
            "model_onnx_identical": hashes[1] == hashes[2]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--sets", default="tiny,resnet", help="comma-separated: tiny, resnet")
    args = ap.parse_args()
    machine = machine_info()
    log(f"{machine['cpu']} | {machine['usable_cores']} usable cores | ISA {', '.join(machine['isa']) or 'none'}")
    sets = {}
    for name in args.sets.split(","):
        with tempfile.TemporaryDirectory(prefix="sqexport-bench-sweep-") as tmp:
            sets[name] = measure(SETS[name], args.repeat, Path(tmp))
    rows = []
    for name, res in sets.items():
        for workers in (1, 2):
            r = res["results"][workers]
            rows.append([name, len(res["jobs"]), workers,
                         "in process, sequential" if workers == 1 else "a spawned process per job",
                         f"{r['wall_s']:.1f}", f"{res['results'][1]['wall_s'] / r['wall_s']:.2f}x",
                         r["other_cpu_load_cores"], res["model_onnx_identical"]])
    table = markdown_table(["set", "jobs", "workers", "how", "wall s", "speedup vs 1", "other CPU load (cores)",
                            "same model.onnx"], rows)
    data = {"benchmark": "sweep", "date": time.strftime("%Y-%m-%d %H:%M"), "revision": project_revision(),
            "machine": machine, "repeat": args.repeat,
            "sets": {k: {**v, "results": {str(w): r for w, r in v["results"].items()}} for k, v in sets.items()}}
    md = "\n".join([
        "# sqexport sweep: 1 vs 2 workers", "",
        f"{data['date']}, revision {data['revision']}; {machine['cpu']}, {machine['usable_cores']} usable cores, "
        f"ISA flags: {', '.join(machine['isa']) or 'none'}. tiny: digits-cnn / digits-mlp jobs of about a "
        "second; resnet: mnist-resnet jobs.", "",
        table, "",
        "Wall-time ratio (1 worker / 2 workers): " + ", ".join(f"{k} **{v['speedup_2_vs_1']:.2f}x**"
                                                              for k, v in sets.items()) + ".",
        "A worker process imports torch and onnxruntime afresh for each job (a job runs in its own process, so a "
        "crash takes only that job): with jobs of about a second that start-up dominates and one in-process "
        "worker wins. Each job's torch uses every core, as `sqexport export` would (same bytes), so two "
        "workers on two cores share them. Other CPU load counts every process but this script, worker "
        "processes included."])
    print(md)
    write_results("sweep", data, md)
    if not all(v["model_onnx_identical"] for v in sets.values()):
        raise SystemExit("model.onnx differs between 1 and 2 workers")


if __name__ == "__main__":
    main()
