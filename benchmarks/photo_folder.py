"""A user's pretrained image classifier with a folder of 8 photos, defaults only, against
onnxruntime's quantize_static on the same baseline.onnx, measured on crops of other photos.

What a new user does first: `sqexport pkg.module:factory --input-shape 1x3x224x224 --calib-data
photos/ --mean ... --std ...`, nothing else. The peers get the same 48 calibration crops sqexport
calibrated on (its own split of the folder) and quantize sqexport's baseline.onnx:

- ort-static: `quantize_static` QDQ, MinMax, per-tensor weights (its defaults);
- ort-static-pc: the same with `per_channel=True`.

Held out: random resized crops (ImageNet-style, seeded) of photos outside the folder; no labels,
so the metrics compare each model with FP32 (KL of the softmax, top-1 / top-5 agreement). Speed:
batch 1, 1 thread, every model interleaved round-robin in one loop, `--repeats` times under the
machine's heavy-job lock; p50 and ratio are medians over repeats.

    python benchmarks/photo_folder.py --lock /tmp/heavy.lock --workdir /tmp/photo-folder

Default model: torchvision's ImageNet MobileNetV2 as a factory (sqexport.models.mobilenet_v2:
load_pretrained), standing in for any pretrained BatchNorm network a user brings.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import latency_table, machine_info, markdown_table, project_revision, quiet, run_sqexport  # noqa: E402

FOLDER = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle", "china", "flower", "retina")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
RESULTS = Path(__file__).resolve().parent / "results"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def write_folder(names: tuple[str, ...], folder: Path) -> None:
    from PIL import Image

    from sqexport.models.photos import load_photo

    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.fromarray(load_photo(name)).save(folder / f"{name}.png")


def held_out_crops(names: tuple[str, ...], per_photo: int, seed: int, size: int, mean: tuple, std: tuple) -> np.ndarray:
    from sqexport.models.photos import normalize, photo_crops

    return normalize(photo_crops(names, per_photo, seed, size=size), mean, std)


def calibration_crops(model: str, shape: str, folder: Path, mean: tuple, std: tuple) -> tuple[str, np.ndarray]:
    """The input name and the calibration crops sqexport used (its own split of the folder)."""
    from sqexport.contracts.shapes import parse_input_shapes
    from sqexport.models.data import apply_user_data
    from sqexport.models.image_data import ImagePrep
    from sqexport.models.zoo import load_model

    spec = load_model(model, None, parse_input_shapes((shape,)))
    size = tuple(int(d) for d in shape.split("x")[-2:])
    spec = apply_user_data(spec, str(folder), None, ImagePrep(size=size, mean=mean, std=std))
    name = spec.input_names[0]
    return name, np.concatenate([np.asarray(b[name]) for b in spec.calib_batches])


def build_ort_static(fp32: Path, calib: np.ndarray, name: str, per_channel: bool, path: Path) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

    from mobilenet import _Reader

    with quiet():
        quantize_static(str(fp32), str(path), _Reader(calib, name), quant_format=QuantFormat.QDQ,
                        calibrate_method=CalibrationMethod.MinMax, per_channel=per_channel,
                        extra_options={"CalibStridedMinMax": 1})


def fidelity(paths: dict[str, Path], x: np.ndarray, name: str) -> dict[str, dict]:
    from sqexport.runtime_check.accuracy import classification_metrics
    from sqexport.runtime_check.session import make_session

    outs = {}
    for k, p in paths.items():
        session = make_session(p, 1)
        outs[k] = np.concatenate([session.run(None, {name: x[i:i + 1]})[0] for i in range(len(x))])
    return {k: classification_metrics(outs["fp32"], o, None) for k, o in outs.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="sqexport.models.mobilenet_v2:load_pretrained")
    ap.add_argument("--input-shape", default="1x3x224x224")
    ap.add_argument("--mean", default=",".join(map(str, IMAGENET_MEAN)), help="the model's input mean (sqexport --mean)")
    ap.add_argument("--std", default=",".join(map(str, IMAGENET_STD)), help="the model's input std (sqexport --std)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/sqexport-photo-folder"))
    ap.add_argument("--per-photo", type=int, default=16, help="held-out crops per photo")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--budget", type=float, default=10.0, help="seconds per model per repeat")
    ap.add_argument("--lock", default=None, help="flock file held while timing (the machine's heavy-job lock)")
    ap.add_argument("--out", type=Path, default=RESULTS / "photo-folder.md")
    args = ap.parse_args()
    from peers import locked

    start = time.time()
    work = args.workdir
    folder = work / "photos"
    write_folder(FOLDER, folder)
    mean, std = (tuple(float(v) for v in a.split(",")) for a in (args.mean, args.std))
    flags = ["--input-shape", args.input_shape, "--calib-data", str(folder), "--mean", args.mean,
             "--std", args.std, "--image-size", "x".join(args.input_shape.split("x")[-2:])]
    log(f"sqexport {args.model} {' '.join(flags)}")
    with locked(args.lock, "sqexport run"):
        code, report = run_sqexport(args.model, flags, work / "sqexport")
    name, calib = calibration_crops(args.model, args.input_shape, folder, mean, std)
    fp32 = work / "sqexport" / "baseline.onnx"
    paths = {"fp32": fp32, "sqexport": work / "sqexport" / "model.onnx",
             "ort-static": work / "ort-static.onnx", "ort-static-pc": work / "ort-static-pc.onnx"}
    with locked(args.lock, "quantize_static"):
        build_ort_static(fp32, calib, name, False, paths["ort-static"])
        build_ort_static(fp32, calib, name, True, paths["ort-static-pc"])
    others = tuple(n for n in ("chelsea", "coffee", "flower", "retina", "gravel", "clock", "moon", "immunohistochemistry",
                               "hubble_deep_field", "camera", "brick", "grass", "coins") if n not in FOLDER)
    size = int(args.input_shape.split("x")[-1])
    held = held_out_crops(others, args.per_photo, seed=1234, size=size, mean=mean, std=std)
    log(f"fidelity on {len(held)} crops of {len(others)} photos outside the folder")
    fid = fidelity(paths, held, name)
    with locked(args.lock, "timing"):
        tables = [latency_table(paths, {name: held[:1]}, [1], 100000, args.budget, log=log)[0][1]
                  for _ in range(args.repeats)]
    speed = {k: {"p50_ms": float(np.median([t[k]["p50"] for t in tables])),
                 "speedup": float(np.median([t[k]["speedup"] for t in tables])),
                 "range": (min(t[k]["speedup"] for t in tables), max(t[k]["speedup"] for t in tables))}
             for k in paths}
    q = report["quantization"]
    result = {"host": machine_info(), "revision": project_revision(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "model": args.model, "mean": mean, "std": std, "folder": FOLDER, "held_out_photos": others, "held_out_crops": int(len(held)),
              "calibration_crops": int(len(calib)), "exit_code": code,
              "gate": {"drop": report["accuracy"]["drop"], "samples": report["accuracy"]["samples"],
                       "passed": report["passed"]},
              "fp32_layers": [f["layer"] for f in q["coverage"]["fp32"]],
              "fallback_confirmation": q.get("fallback_confirmation"), "fidelity": fid, "speed": speed,
              "seconds": round(time.time() - start, 1)}
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    args.out.write_text(render(result))
    print(render(result))


def render(r: dict) -> str:
    host = r["host"]
    rows = []
    for k in ("fp32", "sqexport", "ort-static", "ort-static-pc"):
        f, s = r["fidelity"][k], r["speed"][k]
        rows.append([k, f"{s['p50_ms']:.2f}", f"{s['speedup']:.2f}", f"{s['range'][0]:.2f}-{s['range'][1]:.2f}",
                     f"{f['kl_to_baseline']:.4f}", f"{f['agreement_with_baseline']:.1f}", f"{f['top5_agreement']:.1f}"])
    best_peer = min(("ort-static", "ort-static-pc"), key=lambda k: r["fidelity"][k]["kl_to_baseline"])
    ours, peer = r["fidelity"]["sqexport"], r["fidelity"][best_peer]
    conf = r.get("fallback_confirmation") or {}
    lines = [
        "# A user's pretrained classifier with a folder of 8 photos, defaults only, vs onnxruntime quantize_static",
        "",
        f"- Host: {host['cpu']}, {host['cpu_count']} logical CPUs; ISA flags {', '.join(host['isa']) or 'none'}; "
        f"onnxruntime {host['onnxruntime']}, torch {host['versions'].get('torch')}.",
        f"- Commit `{r['revision']}`, {r['date']}; `python benchmarks/photo_folder.py`; {r['seconds']:.0f} s.",
        f"- Model `{r['model']}`; folder: {', '.join(r['folder'])} ({r['calibration_crops']} calibration crops of "
        "sqexport's own split, which the peers calibrate on too).",
        f"- sqexport defaults: exit {r['exit_code']}, gate drop {r['gate']['drop']:.2f} on {r['gate']['samples']} "
        f"evaluation crops of the folder; FP32 layers: {', '.join(r['fp32_layers']) or 'none'}"
        + (f"; the fallback's confirmation added {conf['added_layers']} layer(s) on the evaluation split"
           if conf.get("added_layers") else "") + ".",
        f"- Held out: {r['held_out_crops']} random resized crops of {len(r['held_out_photos'])} photos outside the "
        f"folder ({', '.join(r['held_out_photos'])}); no labels: KL(FP32 || model) of the softmax and "
        "agreement with FP32.",
        "- Speed: batch 1, 1 thread, all models interleaved in one loop per repeat; medians over repeats.",
        "",
        markdown_table(["variant", "p50 ms", "x FP32", "x FP32 range", "KL to FP32", "top-1 agree %",
                        "top-5 set equal %"], rows),
        "",
        f"sqexport vs the better peer ({best_peer}): speed {r['speed']['sqexport']['p50_ms']:.2f} vs "
        f"{r['speed'][best_peer]['p50_ms']:.2f} ms, KL {ours['kl_to_baseline'] / peer['kl_to_baseline']:.2f}x "
        f"the peer's, top-1 agreement {ours['agreement_with_baseline']:.1f} vs "
        f"{peer['agreement_with_baseline']:.1f} %.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
