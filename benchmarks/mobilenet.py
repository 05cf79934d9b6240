"""MobileNetV2 (torchvision ImageNet weights) on onnxruntime CPU: sqexport's int8 next to
onnxruntime's own quantizers, all from the same FP32 export and judged on the same held-out crops.

Variants:

  fp32                baseline.onnx (torch.onnx export of the unmodified model): reference for every ratio
  ort-{minmax,percentile,entropy}[-rr]
                      onnxruntime.quantization.quantize_static, QDQ format, defaults otherwise
                      (per-tensor weights, uint8 activations), calibrated on the same crops as
                      sqexport; `-rr` = reduce_range=True (7-bit weights, what x86 kernels without VNNI
                      need to stay exact)
  ort-dynamic         quantize_dynamic (int8 weights, activations at run time; convs not fused)
  sqexport            the default recipe of `sqexport mobilenet-v2` (no pruning, static int8)
  sqexport-minmax     plain static int8 (per-channel 7-bit weights, min-max activation ranges),
  sqexport+X          then with the remedies added one at a time and together: bc = bias
                      correction, mse = MSE-chosen activation ranges, cle = cross-layer
                      equalization (ReLU6 of equalized pairs as ReLU), ada = AdaRound (learned
                      weight rounding, its default knobs; its time is logged while building)

No labels exist for these photos, so accuracy is agreement with fp32: top-1 agreement (%), top-5
set agreement (%) and mean KL(fp32 softmax || variant softmax), on the 336 held-out crops.
Latency: one 224x224 image, every variant interleaved in one run, at 1 and 2 threads; p50 and the
ratio fp32 p50 / variant p50.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/mobilenet.py [--accuracy-only] [--only a,b] [--workdir DIR]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import sys
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import latency_table, machine_info, markdown_table, project_revision, size_of, write_results  # noqa: E402

from sqexport.exporters.export import export_model  # noqa: E402
from sqexport.models.zoo import load_model  # noqa: E402
from sqexport.runtime_check.accuracy import classification_metrics, run_session  # noqa: E402
from sqexport.runtime_check.session import make_session  # noqa: E402
from sqexport.toolchain.folding import copy_for_compression, fold_batchnorm  # noqa: E402
from sqexport.toolchain.quantization.adaround import AdaRoundConfig  # noqa: E402
from sqexport.toolchain.quantization.int8 import Int8StaticConfig  # noqa: E402
from sqexport.toolchain.quantization.equalization import equalize  # noqa: E402
from sqexport.toolchain.quantize_step import quantize_to_onnx  # noqa: E402
from sqexport.toolchain.recipe import Stage  # noqa: E402

ORT_METHODS = ("minmax", "percentile", "entropy")
ORT_CALIB_BATCH = 8  # histogram calibrators keep every collected output: feed a few images at a time


def log(msg: str) -> None:
    print(f"[mobilenet] {msg}", file=sys.stderr, flush=True)


def default_config() -> Int8StaticConfig:
    """What `sqexport mobilenet-v2` runs (models/mobilenet_spec.py: the zoo's quantization defaults)."""
    from sqexport.models.mobilenet_spec import RECIPE_PARAMS

    return Int8StaticConfig(**RECIPE_PARAMS)


REMEDIES = {  # row name -> (config changes on top of plain min-max static int8, equalization mode)
    "sqexport-minmax": ({}, None),
    "sqexport+bc": ({"bias_correction": True}, None),
    "sqexport+mse": ({"observer": "mse"}, None),
    "sqexport+mean-minmax": ({"observer": "mean-minmax"}, None),
    "sqexport+mean-minmax+bc": ({"observer": "mean-minmax", "bias_correction": True}, None),
    "sqexport+cle": ({}, "relu"),
    "sqexport+mse+bc": ({"observer": "mse", "bias_correction": True}, None),
    "sqexport+mse+bc+cle": ({"observer": "mse", "bias_correction": True}, "relu"),
    "sqexport+mse+ada": ({"observer": "mse", "adaround": True}, None),
    "sqexport+mse+bc+ada": ({"observer": "mse", "bias_correction": True, "adaround": True}, None),
}


def remedy_variants(base: Int8StaticConfig) -> dict[str, tuple[Int8StaticConfig, str | None]]:
    """Every combination row; the one equal to the zoo's default is also named `sqexport`."""
    plain = replace(base, observer="minmax", bias_correction=False, adaround=AdaRoundConfig())
    out = {name: (replace(plain, **changes), cle) for name, (changes, cle) in REMEDIES.items()}
    default = next((n for n, (c, cle) in out.items() if c == base and cle is None), None)
    if default is None:
        return {"sqexport": (base, None), **out}
    return {("sqexport" if n == default else n): v for n, v in out.items()}


def build_sqexport(spec, config: Int8StaticConfig, cle: str | None, path: Path) -> None:
    """`cle`: cross-layer equalization (transform.equalize) with this ReLU6 mode first, or None."""
    work, _ = fold_batchnorm(copy_for_compression(spec.model))
    if cle is not None:
        equalize(work, relu6=cle)
    prepared = export_model(spec, work, path.with_suffix(".prepared.onnx"))
    quantize_to_onnx(work, spec, Stage("quantize", "int8", config), prepared, path, 1.0, "cpu")
    path.with_suffix(".prepared.onnx").unlink()


class _Reader:
    """onnxruntime CalibrationDataReader over the calibration crops, ORT_CALIB_BATCH at a time;
    set_range lets quantize_static collect a stride at a time (CalibStridedMinMax)."""

    def __init__(self, x: np.ndarray, name: str):
        self.items = [{name: x[i:i + ORT_CALIB_BATCH]} for i in range(0, len(x), ORT_CALIB_BATCH)]
        self.set_range(0, len(self.items))

    def __len__(self):
        return len(self.items)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.it = iter(self.items[start_index:end_index])

    def get_next(self):
        return next(self.it, None)

    def rewind(self):
        self.set_range(0, len(self.items))


def build_ort_static(fp32: Path, calib: np.ndarray, name: str, method: str, reduce_range: bool, path: Path) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

    cm = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
          "entropy": CalibrationMethod.Entropy}[method]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        logging.getLogger().setLevel(logging.ERROR)
        quantize_static(str(fp32), str(path), _Reader(calib, name), quant_format=QuantFormat.QDQ,
                        calibrate_method=cm, reduce_range=reduce_range,
                        extra_options={"CalibStridedMinMax": 1})


def build_ort_dynamic(fp32: Path, path: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        quantize_dynamic(str(fp32), str(path), weight_type=QuantType.QInt8)


def fused_ops(path: Path) -> dict:
    """Op counts of the graph onnxruntime actually runs (after its QDQ fusions)."""
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    out = path.with_suffix(".optimized.onnx")
    so.optimized_model_filepath = str(out)
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    counts: dict[str, int] = {}
    for n in onnx.load(str(out)).graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    out.unlink()
    return counts


def build_all(spec, workdir: Path, only: set[str] | None) -> dict[str, Path]:
    fp32 = workdir / "fp32.onnx"
    export_model(spec, spec.model, fp32)
    paths = {"fp32": fp32}
    calib = np.concatenate([b[spec.input_names[0]] for b in spec.calib_batches])

    def want(name):
        return only is None or name in only

    for name, (cfg, cle) in remedy_variants(default_config()).items():
        if want(name):
            log(f"building {name}: {cfg}, equalize={cle}")
            t0 = time.perf_counter()
            build_sqexport(spec, cfg, cle, workdir / f"{name}.onnx")
            log(f"built {name} in {time.perf_counter() - t0:.0f} s")
            paths[name] = workdir / f"{name}.onnx"
    for method in ORT_METHODS:
        for rr in (False, True):
            name = f"ort-{method}" + ("-rr" if rr else "")
            if want(name):
                log(f"building {name}")
                build_ort_static(fp32, calib, spec.input_names[0], method, rr, workdir / f"{name}.onnx")
                paths[name] = workdir / f"{name}.onnx"
    if want("ort-dynamic"):
        log("building ort-dynamic")
        build_ort_dynamic(fp32, workdir / "ort-dynamic.onnx")
        paths["ort-dynamic"] = workdir / "ort-dynamic.onnx"
    return paths


def accuracy(spec, paths: dict[str, Path]) -> dict[str, dict]:
    outs = {k: run_session(make_session(p, 2), spec.eval_batches, spec.postprocess) for k, p in paths.items()}
    base = outs["fp32"]
    return {k: classification_metrics(base, v, None) for k, v in outs.items()}


def render(rows: dict, lat: dict, sizes: dict, ops: dict) -> str:
    headers = ["variant", "top-1 agree %", "top-5 agree %", "KL", "size MB"]
    for t in sorted(lat):
        headers += [f"p50 ms {t}t", f"x fp32 {t}t"]
    headers.append("QLinearConv / Conv (fp32)")
    table = []
    for k, m in rows.items():
        # classification_metrics reports shares in percent already
        r = [k, f"{m['agreement_with_baseline']:.1f}", f"{m['top5_agreement']:.1f}",
             f"{m['kl_to_baseline']:.4f}", f"{sizes[k]['mb']:.2f}"]
        for t in sorted(lat):
            r += [f"{lat[t][k]['p50']:.2f}", f"{lat[t][k]['speedup']:.2f}"] if k in lat[t] else ["", ""]
        r.append(f"{ops[k].get('QLinearConv', 0)} / {ops[k].get('Conv', 0) + ops[k].get('FusedConv', 0)}")
        table.append(r)
    return markdown_table(headers, table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--accuracy-only", action="store_true", help="skip latency")
    ap.add_argument("--only", default=None, help="comma-separated variant names (fp32 is always built)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--budget", type=float, default=60.0, help="seconds per latency run")
    args = ap.parse_args()
    only = set(args.only.split(",")) if args.only else None
    spec = load_model("mobilenet-v2")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        paths = build_all(spec, workdir, only)
        log(f"built {len(paths)} models in {time.perf_counter() - t0:.0f} s")
        rows = accuracy(spec, paths)
        sizes = {k: size_of(p) for k, p in paths.items()}
        ops = {k: fused_ops(p) for k, p in paths.items()}
        lat, others = ({}, {}) if args.accuracy_only else latency_table(
            paths, spec.example_inputs, [1, 2], max_iters=400, budget_s=args.budget, log=log)
    md = render(rows, lat, sizes, ops)
    print(md)
    if not args.accuracy_only:
        data = {"machine": machine_info(), "revision": project_revision(), "config": str(default_config()),
                "accuracy": rows, "latency_ms": {str(t): v for t, v in lat.items()}, "sizes": sizes,
                "fused_ops": ops, "other_cpu_load_cores": {str(t): v for t, v in others.items()},
                "eval_samples": rows["fp32"]["samples"]}
        header = (f"# MobileNetV2 int8 on onnxruntime {data['machine']['onnxruntime']} "
                  f"({data['machine']['cpu']}, {', '.join(data['machine']['isa'])})\n\n"
                  f"revision {data['revision']}; sqexport default: `{data['config']}`; "
                  f"other processes used {', '.join(f'{v:.2f}' if v is not None else '?' for v in others.values())} "
                  f"cores during the 1 / 2 thread runs.\n"
                  f"Accuracy is agreement with fp32 on {data['eval_samples']} held-out crops (no labels).\n\n")
        write_results("mobilenet", data, header + md)
        log(json.dumps({"written": "benchmarks/results/mobilenet.{json,md}"}))


if __name__ == "__main__":
    main()
