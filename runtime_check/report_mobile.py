"""report.md sections for `mobile`, `arm64` and `device_latency`."""
from __future__ import annotations

__all__ = ["render_mobile_sections"]


def _mobile(m: dict) -> list[str]:
    ort, ver = m["ort"], m["verify"]
    lines = ["", "## Mobile", "",
             f"- model.ort: ORT format v{ort['ort_format_version']} (onnxruntime >= {ort['min_onnxruntime']}), "
             f"{ort['optimization_style']} optimizations for {ort['target_platform']}, "
             f"{m['sizes']['ort']['raw']:,} bytes ({m['sizes']['ort']['compressed']:,} zipped); "
             f"input shapes {m['input_shapes']}",
             f"- .ort vs model.onnx on {ver['samples']} samples: max |diff| {ver['vs_model_onnx']['max_abs_diff']:.3g} "
             f"(tolerance {ver['vs_model_onnx']['tolerance']:.3g})",
             f"- .ort {ver['accuracy']['metric']}: {ver['accuracy']['model']:.4f} (baseline {ver['accuracy']['baseline']:.4f})",
             f"- peak memory of a session: {ver['memory_mb'].get('peak_rss')} MB resident "
             f"({ver['memory_mb'].get('session')} MB added by the session)", "",
             "| threads | baseline p50 / p90 ms | model.ort p50 / p90 ms | speedup |", "|---|---|---|---|"]
    for t, e in ver["latency_ms"].items():
        lines.append(f"| {t} | {e['baseline']['p50']:.3f} / {e['baseline']['p90']:.3f} | "
                     f"{e['model']['p50']:.3f} / {e['model']['p90']:.3f} | {e['speedup']:.2f}x |")
    lines += ["", "| provider | nodes covered | partitions | unsupported ops | verdict |", "|---|---|---|---|---|"]
    for key in ("nnapi", "coreml_mlprogram", "coreml_neuralnetwork"):
        u = m["usability"][key]
        lines.append(f"| {u['provider']} | {u['nodes_covered']}/{u['nodes']} | {u['partitions']} | "
                     f"{', '.join(u['unsupported_ops']) or '-'} | {u['verdict']} |")
    lines += [""] + [f"- {n}" for n in m["usability"]["notes"]]
    if m.get("bundle"):
        lines.append(f"- bundle: {m['bundle']['file']} ({m['bundle']['bytes']:,} bytes)")
    return lines


def _arm64(a: dict) -> list[str]:
    if "skipped" in a:
        return ["", "## ARM64 (emulated)", "", f"- skipped: {a['skipped']}"]
    lines = ["", "## ARM64 (emulated aarch64 onnxruntime; outputs only, timings are not latency)", "",
             f"{a['samples']} samples; reference: {a['x86_reference']}", "",
             f"match: {a.get('match_criterion', 'max |diff| within tolerance')}", "",
             "| tier | CPU features | x86 reference closer on most samples | max rel. L2 error | mean rel. L2 error | max |diff| "
             "| match | metric |", "|---|---|---|---|---|---|---|---|"]
    for tier, t in a["tiers"].items():
        v = t["vs_x86_int8_kernels"] if t.get("closest_x86_reference") == "x86 int8 kernels" else t["vs_x86"]
        v = {**v, **{k: c for k, c in t.get("closer_per_sample", {}).items() if k.endswith("rel_error")}}
        lines.append(f"| {tier} | {t['cpu_features']} | {t.get('closest_x86_reference', 'exact QDQ arithmetic')} | "
                     f"{v.get('max_rel_error', float('nan')):.3g} | {v.get('mean_rel_error', float('nan')):.3g} | "
                     f"{v['max_abs_diff']:.3g} | {'yes' if t.get('matches_x86', v['within_tolerance']) else 'NO'} | "
                     f"{t['accuracy']['metric']} {t['accuracy']['model']:.4f} |")
    return lines


def _device(d: dict) -> list[str]:
    lines = ["", "## Device latency", "", f"- device: {d['device']} ({d.get('cpu')}, {d.get('machine')}), "
             f"onnxruntime {d.get('onnxruntime')}; same model: {d['same_model']}; reference reproduced: "
             f"{d['reproduced']}", "", "| threads | p50 ms | p90 ms |", "|---|---|---|"]
    lines += [f"| {t} | {v['p50']:.3f} | {v['p90']:.3f} |" for t, v in d["latency_ms"].items()]
    return lines


def render_mobile_sections(r: dict) -> list[str]:
    lines = []
    if r.get("mobile"):
        lines += _mobile(r["mobile"])
        if r["mobile"].get("arm64"):
            lines += _arm64(r["mobile"]["arm64"])
    if r.get("arm64"):
        lines += _arm64(r["arm64"])
    if r.get("device_latency"):
        lines += _device(r["device_latency"])
    return lines
