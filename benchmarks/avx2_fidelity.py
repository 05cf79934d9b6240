"""Fidelity on x86 without VNNI: every peer's int8 model run by onnxruntime's AVX2 kernels.

A host without VNNI computes u8 x s8 products in saturating int16 pairs, so a model's fidelity there
can differ from what a VNNI host measures. This runs each model of a `peers.py --workdir` under
`qemu-x86_64-static -cpu Haswell` (AVX2, no VNNI: MLAS takes its AVX2 path; emulation says nothing
about speed) and natively, on the same held-out samples, and compares both with FP32:

  sqexport-avx2   sqexport's defaults built as on a host without VNNI (Haswell's CPU flags): the
                  pair-limited 8-bit weight grid (docs/methods.md)
  sqexport        sqexport's defaults built on this host (unconstrained 8-bit where it has VNNI)
  sqexport-7bit   the 7-bit weights hosts without VNNI got before the pair-limited grid
  peers           whatever peers.py built there: onnxruntime quantize_dynamic / quantize_static,
                  NNCF (its QDQ graphs as they are)

Usage: benchmarks/avx2_fidelity.py --workdir /work/peers-work --models minilm [--samples 64]
Writes results/avx2-fidelity.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import HASWELL_FLAGS, machine_info, markdown_table, project_revision, write_results  # noqa: E402

CHILD = """
import sys, json, numpy as np, onnxruntime as ort
model, feeds, out = sys.argv[1:]
data = np.load(feeds)
n = int(data["n"])
opts = ort.SessionOptions(); opts.intra_op_num_threads = 1
s = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
names = {i.name for i in s.get_inputs()}
res = {}
for b in range(n):
    feed = {k.split("/", 1)[1]: data[k] for k in data.files if k.startswith(f"{b}/") and k.split("/", 1)[1] in names}
    for j, o in enumerate(s.run(None, feed)):
        res[f"{b}/{j}"] = o
np.savez(out, **res)
"""
BUILD = """
import sys
import sqexport.runtime_check.isa as isa
isa.cpu_flags = lambda: frozenset({flags})
from sqexport.toolchain.cli import cli
cli.main(["export", sys.argv[1], "--prune", "none", "--threads", "1", "-o", sys.argv[2], "--quiet"])
"""


def log(msg: str) -> None:
    print(f"[avx2-fidelity] {msg}", file=sys.stderr, flush=True)


def build_avx2_model(model: str, out: Path) -> Path:
    """sqexport's defaults, built as on a host without VNNI, in a child process."""
    if not (out / "model.onnx").is_file():
        code = BUILD.replace("{flags}", repr(set(sorted(HASWELL_FLAGS))))
        proc = subprocess.run([sys.executable, "-c", code, model, str(out)], capture_output=True, text=True,
                              timeout=1800)
        if proc.returncode not in (0, 1):  # 1: a gate failed, the model is still written
            raise SystemExit(f"building {model} as on a host without VNNI failed:\n{proc.stderr[-2000:]}")
    return out / "model.onnx"


def raw_outputs(model: Path, feeds: Path, emulate: bool, tmp: Path) -> list[list[np.ndarray]]:
    script, out = tmp / "child.py", tmp / f"out-{model.stem}-{int(emulate)}.npz"
    script.write_text(CHILD)
    cmd = (["qemu-x86_64-static", "-cpu", "Haswell"] if emulate else []) + [sys.executable, str(script), str(model),
                                                                           str(feeds), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=7200)
    if proc.returncode != 0:
        raise SystemExit(f"{model} ({'emulated' if emulate else 'native'}) failed:\n{proc.stderr[-2000:]}")
    data = np.load(out)
    batches: dict[int, dict[int, np.ndarray]] = {}
    for key in data.files:
        b, j = map(int, key.split("/"))
        batches.setdefault(b, {})[j] = data[key]
    return [[outs[j] for j in sorted(outs)] for _, outs in sorted(batches.items())]


def variants(work: Path, avx2: Path) -> dict[str, Path]:
    found = {"fp32": work / "sqexport" / "baseline.onnx", "sqexport-avx2": avx2, "sqexport": work / "sqexport" / "model.onnx",
             "sqexport-7bit": work / "sqexport-7bit" / "model.onnx"}
    for name in ("ort-dynamic", "ort-static", "ort-static-pc", "nncf", "nncf-transformer", "nncf-ort"):
        if (work / f"{name}.onnx").is_file():
            found[name] = work / f"{name}.onnx"
    return {k: v for k, v in found.items() if v.is_file()}


def measure(model: str, work: Path, samples: int) -> dict:
    from sqexport.models.zoo import load_model
    from sqexport.runtime_check.accuracy import classification_metrics, embedding_metrics

    spec = load_model(model)
    batches, taken = [], 0
    for b in spec.eval_batches:  # the held-out samples peers.py measures on, first `samples` of them
        n = len(next(iter(b.values())))
        keep = min(n, samples - taken)
        if keep <= 0:
            break
        batches.append({k: v[:keep] for k, v in b.items()})
        taken += keep
    paths = variants(work, build_avx2_model(model, work / "sqexport-avx2"))
    log(f"{model}: {taken} samples, variants {', '.join(paths)}")
    with tempfile.TemporaryDirectory(prefix="avx2-fidelity-") as tmp_name:
        tmp = Path(tmp_name)
        feeds = tmp / "feeds.npz"
        np.savez(feeds, n=len(batches), **{f"{i}/{k}": v for i, b in enumerate(batches) for k, v in b.items()})
        outs = {}
        for name, path in paths.items():
            for emulate in (False, True):
                log(f"{model}: {name} {'under qemu -cpu Haswell' if emulate else 'native'}")
                raw = raw_outputs(path, feeds, emulate, tmp)
                outs[(name, emulate)] = np.concatenate([spec.postprocess(r, b) for r, b in zip(raw, batches)])
    base = outs[("fp32", False)]
    metric = (lambda o: classification_metrics(base, o, None)) if spec.task == "image-classification" \
        else (lambda o: embedding_metrics(base, o))
    rows = {}
    for name in paths:
        native, emulated = outs[(name, False)], outs[(name, True)]
        flat_n, flat_e = native.reshape(len(native), -1), emulated.reshape(len(emulated), -1)
        cos = (flat_n * flat_e).sum(1) / np.maximum(np.linalg.norm(flat_n, axis=1) * np.linalg.norm(flat_e, axis=1), 1e-12)
        rows[name] = {"native": metric(native), "avx2": metric(emulated), "avx2_vs_native_min_cos": float(cos.min()),
                      "avx2_equals_native": bool(np.array_equal(native, emulated))}
    return {"samples": taken, "task": spec.task, "variants": {k: str(v) for k, v in paths.items()}, "rows": rows}


def render(model: str, res: dict) -> str:
    image = res["task"] == "image-classification"
    keys = (("kl_to_baseline", "KL"), ("agreement_with_baseline", "top-1 agree %")) if image else \
        (("model", "mean cos"), ("min_cosine", "min cos"))
    head = ["variant"] + [f"{label} {where}" for where in ("VNNI host", "AVX2 (emulated)") for _, label in keys] + \
        ["min cos(AVX2 output, VNNI-host output)"]
    rows = []
    for name, r in res["rows"].items():
        vals = [r[where].get(key) for where in ("native", "avx2") for key, _ in keys]
        rows.append([name] + [f"{v:.4f}" if isinstance(v, float) else str(v) for v in vals] +
                    ["identical" if r["avx2_equals_native"] else f"{r['avx2_vs_native_min_cos']:.6f}"])
    return f"## {model}\n\n{res['samples']} held-out samples.\n\n" + markdown_table(head, rows) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True, help="a peers.py --workdir with the peers' models built")
    ap.add_argument("--models", default="minilm")
    ap.add_argument("--samples", type=int, default=64)
    args = ap.parse_args()
    if shutil.which("qemu-x86_64-static") is None:
        raise SystemExit("needs qemu-x86_64-static (apt-get install qemu-user-static)")
    results = {m: measure(m, Path(args.workdir) / m, args.samples) for m in args.models.split(",")}
    md = "\n".join(render(m, r) for m, r in results.items())
    print(md)
    write_results("avx2-fidelity", {"machine": machine_info(), "revision": project_revision(), "results": results}, md)


if __name__ == "__main__":
    main()
