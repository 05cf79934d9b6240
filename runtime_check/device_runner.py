"""On-device runner: shipped in the mobile bundle as run_model.py; needs only numpy and onnxruntime.

    python run_model.py MODEL [--reference reference.npz] [--threads 1,2] [--iters 50]
                              [--save-outputs OUT.npz] [--no-timing] [--budget-s S]

Prints one JSON line: the model's sha256, onnxruntime version, CPU, p50/p90 latency per thread
count, peak memory, the sha256 of the outputs on the reference inputs and how far they are from
the reference outputs. reference.npz holds `input:NAME` and `output:NAME` arrays whose first axis
counts samples (each sample is one run at the model's fixed input shapes). `--budget-s`: run the
reference samples in order only until that many seconds have passed (at least one), and compare
those (under emulation a run is 100x slower than on the host that chose the samples).
This file must stay standalone: it runs on phones and under emulation, without sqexport.
"""
import argparse
import hashlib
import json
import os
import platform
import resource
import sys
import time

import numpy as np
import onnxruntime as ort

RUNNER_VERSION = 1


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cpu_description():
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return platform.processor() or platform.machine()
    for key in ("model name", "Hardware", "Model"):
        for line in info.splitlines():
            if line.split(":")[0].strip() == key:
                return line.split(":", 1)[1].strip()
    parts = sorted({line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("CPU part")})
    features = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("Features")), [])
    tier = "i8mm" if "i8mm" in features else "dotprod" if "asimddp" in features else "neon"
    return f"{platform.machine()} CPU part {','.join(parts) or '?'} ({tier})"


def rss_kb(field):
    """VmRSS / VmHWM from /proc (Linux, Android); ru_maxrss as the fallback for the peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss if field == "VmHWM" else None


def make_session(model, threads):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    # replays optimizations saved in a "Runtime"-style .ort (sqexport writes "Fixed": a no-op there)
    so.add_session_config_entry("session.enable_saved_runtime_optimizations", "1")
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def reference_feeds(path, session):
    data = np.load(path)
    names = [i.name for i in session.get_inputs()]
    n = len(data["input:" + names[0]])
    feeds = [{k: data["input:" + k][i] for k in names} for i in range(n)]
    outputs = {k[len("output:"):]: data[k] for k in data.files if k.startswith("output:")}
    return feeds, outputs


def synthetic_feed(session):
    types = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32}
    feed = {}
    for i in session.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in i.shape]
        feed[i.name] = np.ones(shape, types.get(i.type, np.float32))
    return feed


def int8_saturates():
    """x86 without VNNI: onnxruntime's u8s8 kernels saturate int16 sums of full-range int8 weights."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return True
    return not ({"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags))


def compare(outputs, reference):
    """Max |diff| vs the reference outputs, the lowest per-sample cosine, and agreement of the
    argmax over the last axis."""
    out = {"max_abs_diff": 0.0, "reference_max_abs": 0.0, "min_cosine": 1.0, "max_rel_error": 0.0}
    for name, ref in reference.items():
        got = outputs[name].astype(np.float64)
        out["max_abs_diff"] = max(out["max_abs_diff"], float(np.abs(got - ref).max()))
        out["reference_max_abs"] = max(out["reference_max_abs"], float(np.abs(ref).max()))
        g, r = got.reshape(len(got), -1), ref.reshape(len(ref), -1).astype(np.float64)
        g_norm, r_norm = np.linalg.norm(g, axis=1), np.linalg.norm(r, axis=1)
        cos = (g * r).sum(1) / np.maximum(g_norm * r_norm, 1e-12)
        out["min_cosine"] = min(out["min_cosine"], float(cos.min()))
        # per-sample relative L2 error, as the host judges ARM64 (runtime_check/agreement.py; this
        # file runs on the device with numpy only, so it cannot import it)
        floor = max(0.1 * float(np.median(r_norm)), 1e-12)
        rel = np.linalg.norm(g - r, axis=1) / np.maximum(r_norm, floor)
        out["max_rel_error"] = max(out["max_rel_error"], float(rel.max()))
        if ref.ndim == 3 and ref.shape[-1] > 1:  # (sample, batch, classes): logits
            agree = (got.argmax(-1) == ref.argmax(-1)).mean()
            out["argmax_agreement"] = min(out.get("argmax_agreement", 1.0), float(agree))
    return out


def time_runs(session, feed, iters, warmup=5):
    for _ in range(warmup):
        session.run(None, feed)
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        session.run(None, feed)
        samples.append((time.perf_counter() - t0) * 1000.0)
    return {"p50": float(np.percentile(samples, 50)), "p90": float(np.percentile(samples, 90)), "n": iters}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--reference")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--save-outputs")
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--budget-s", type=float, default=None)
    args = ap.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",") if t]
    rss0 = rss_kb("VmRSS")
    session = make_session(args.model, threads[0])
    result = {"runner": RUNNER_VERSION, "model": os.path.basename(args.model),
              "model_sha256": sha256_file(args.model), "onnxruntime": ort.__version__,
              "machine": platform.machine(), "cpu": cpu_description(), "python": platform.python_version(),
              "int8_saturates": int8_saturates()}
    if args.reference:
        feeds, reference = reference_feeds(args.reference, session)
        names = [o.name for o in session.get_outputs()]
        runs, start = [], time.perf_counter()
        for f in feeds:
            if runs and args.budget_s is not None and time.perf_counter() - start > args.budget_s:
                break
            runs.append(session.run(None, f))
        outputs = {n: np.stack([r[k] for r in runs]) for k, n in enumerate(names)}
        digest = hashlib.sha256(b"".join(np.ascontiguousarray(outputs[n]).tobytes() for n in names))
        result["outputs_sha256"] = digest.hexdigest()
        result["reference"] = compare(outputs, {n: v[:len(runs)] for n, v in reference.items()})
        result["reference"]["samples"] = len(runs)
        result["reference"]["samples_given"] = len(feeds)
        if args.save_outputs:
            np.savez(args.save_outputs, **{"output:" + n: v for n, v in outputs.items()})
        feed = feeds[0]
    else:
        feed = synthetic_feed(session)
    if not args.no_timing:
        result["latency_ms"] = {}
        for t in threads:
            s = session if t == threads[0] else make_session(args.model, t)
            result["latency_ms"][str(t)] = time_runs(s, feed, args.iters)
    peak = rss_kb("VmHWM")
    result["memory_mb"] = {"peak_rss": round(peak / 1024, 2) if peak else None,
                           "session": round((peak - rss0) / 1024, 2) if peak and rss0 else None}
    sys.stdout.write(json.dumps(result, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
