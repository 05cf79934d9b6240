"""`sqexport sweep` wall time: the same sweep with 1 worker (jobs one after another, in process)
and with 2 worker processes, each run as a user runs it (the CLI in a child process, a fresh ROOT).

    .venv/bin/python benchmarks/sweep.py                # 8 tiny jobs (digits-cnn / digits-mlp)
    .venv/bin/python benchmarks/sweep.py --repeat 2     # twice each, the faster run counts

Prints a Markdown table (workers, wall seconds, ratio) with the machine's CPU flags and load; writes
results/sweep.json and results/sweep.md. A worker process pays its own interpreter + torch import
(seconds) per job, so with jobs this small the ratio shows that overhead as much as the parallelism;
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

JOBS = [
    ("cnn-mag50", "digits-cnn", {"prune": "magnitude", "sparsity": 0.5}),
    ("cnn-mag25", "digits-cnn", {"prune": "magnitude", "sparsity": 0.25}),
    ("cnn-nm", "digits-cnn", {"prune": "nm", "nm": "2:4"}),
    ("cnn-dyn", "digits-cnn", {"prune": "none", "quant": "int8-dynamic"}),
    ("mlp-none", "digits-mlp", {"prune": "none"}),
    ("mlp-mag50", "digits-mlp", {"prune": "magnitude", "sparsity": 0.5}),
    ("mlp-struct", "digits-mlp", {"prune": "structured", "sparsity": 0.25}),
    ("mlp-dyn", "digits-mlp", {"prune": "none", "quant": "int8-dynamic"}),
]


def log(msg: str) -> None:
    print(f"[sweep] {msg}", file=sys.stderr, flush=True)


def sweep_yaml() -> str:
    lines = ["jobs:"]
    for name, model, opts in JOBS:
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


def digests(root: Path) -> dict[str, str]:
    return {name: hashlib.sha256((root / name / "model.onnx").read_bytes()).hexdigest() for name, _, _ in JOBS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    machine = machine_info()
    log(f"{machine['cpu']} | {machine['usable_cores']} usable cores | ISA {', '.join(machine['isa']) or 'none'}")
    rows, results, hashes = [], {}, {}
    with tempfile.TemporaryDirectory(prefix="sqexport-bench-sweep-") as tmp:
        sweep = Path(tmp) / "sweep.yaml"
        sweep.write_text(sweep_yaml())
        for workers in (1, 2):
            best, load = None, None
            for r in range(args.repeat):
                root = Path(tmp) / f"w{workers}-{r}"
                wall, other = other_cpu_load(lambda: run(sweep, root, workers))
                log(f"{workers} worker(s), run {r + 1}: {wall:.1f} s (other load {other if other is None else round(other, 2)} cores)")
                hashes.setdefault(workers, digests(root))
                if best is None or wall < best:
                    best, load = wall, other
            results[workers] = {"wall_s": round(best, 2), "other_cpu_load_cores": load and round(load, 2)}
    same = hashes[1] == hashes[2]
    ratio = results[1]["wall_s"] / results[2]["wall_s"]
    for workers in (1, 2):
        rows.append([workers, "in process, sequential" if workers == 1 else "spawned processes",
                     f"{results[workers]['wall_s']:.1f}", f"{results[1]['wall_s'] / results[workers]['wall_s']:.2f}x",
                     results[workers]["other_cpu_load_cores"]])
    table = markdown_table(["workers", "how", "wall s", "speedup vs 1", "other CPU load (cores)"], rows)
    data = {"benchmark": "sweep", "date": time.strftime("%Y-%m-%d %H:%M"), "revision": project_revision(),
            "machine": machine, "jobs": [{"name": n, "model": m, **o} for n, m, o in JOBS], "repeat": args.repeat,
            "results": {str(k): v for k, v in results.items()}, "speedup_2_vs_1": round(ratio, 3),
            "model_onnx_identical": same}
    md = "\n".join([
        "# sqexport sweep: 1 vs 2 workers", "",
        f"{data['date']}, revision {data['revision']}; {machine['cpu']}, {machine['usable_cores']} usable cores, "
        f"ISA flags: {', '.join(machine['isa']) or 'none'}; {len(JOBS)} jobs on digits-cnn / digits-mlp.", "",
        table, "",
        f"Wall-time ratio (1 worker / 2 workers): **{ratio:.2f}x**. model.onnx identical across the two runs: {same}.",
        "Other CPU load counts every process but this script, so the worker processes' own work shows there; "
        "on a shared machine the absolute seconds are inflated. Each worker process imports torch "
        "and onnxruntime afresh per job: with jobs of a few seconds that start-up is a large share."])
    print(md)
    write_results("sweep", data, md)
    if not same:
        raise SystemExit("model.onnx differs between 1 and 2 workers")


if __name__ == "__main__":
    main()
