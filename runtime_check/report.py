"""Report -> report.json and report.md."""
from __future__ import annotations

import json
from pathlib import Path

from runtime_check.report_mobile import render_mobile_sections

__all__ = ["write_report", "render_markdown"]


def _fmt(x, digits=4):
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def render_markdown(r: dict) -> str:
    lines = [f"# sqexport report: {r['model']} ({r['target']})", "",
             f"**{'PASSED' if r['passed'] else 'FAILED'}**", ""]
    lines += ["## Checks", "", "| check | value | limit | passed |", "|---|---|---|---|"]
    lines += [f"| {c['name']} | {_fmt(c['value'])} | {_fmt(c['limit'])} | {'yes' if c['passed'] else 'NO'} |"
              for c in r["checks"]] or ["| (no gates) | | | |"]
    acc = r["accuracy"]
    lines += ["", "## Accuracy", "", f"metric `{acc['metric']}`: baseline {_fmt(acc['baseline'])}, "
              f"model {_fmt(acc['model'])}, drop {_fmt(acc['drop'])}"]
    if acc.get("pooling"):
        pl = acc["pooling"]
        lines.append(f"- pooling: {' + '.join(pl['modes'])}{', L2-normalized' if pl['normalize'] else ''} "
                     f"({pl['source']})" + (f"; model.onnx output `{pl['onnx_output']}`" if pl.get("onnx_output") else ""))
    if acc["metric"] == "top1_agreement":
        lines.append("- no labels: the metric is top-1 agreement with the FP32 model (baseline.onnx); "
                     "top-5 agreement compares the top-5 class sets, KL is KL(FP32 softmax || model softmax)")
    for k in ("min_cosine", "spearman", "agreement_with_baseline", "top5_agreement", "kl_to_baseline"):
        if k in acc:
            lines.append(f"- {k}: {_fmt(acc[k])}")
    if "max_abs_deviation" in r.get("fidelity", {}):
        f = r["fidelity"]
        lines.append(f"- onnxruntime vs torch quantized model: max |deviation| {f['max_abs_deviation']:.3g}"
                     + (f", argmax agreement {f['argmax_agreement']:.4f}" if "argmax_agreement" in f else ""))
    lat = r["latency_ms"]
    lines += ["", "## Latency (p50 / p90 ms, interleaved, same run)", "",
              "| threads | baseline | model | speedup |", "|---|---|---|---|"]
    for entry in [lat] + ([lat["at_1_thread"]] if "at_1_thread" in lat else []):
        lines.append(f"| {entry['threads']} | {entry['baseline']['p50']:.3f} / {entry['baseline']['p90']:.3f} | "
                     f"{entry['model']['p50']:.3f} / {entry['model']['p90']:.3f} | {entry['speedup']:.2f}x |")
    s = r["size_bytes"]
    lines += ["", "## Size", "", f"- baseline.onnx: {s['baseline']:,} bytes "
              f"({s.get('baseline_compressed', 0):,} zipped)",
              f"- model.onnx: {s['model']:,} bytes ({s['compressed']:,} zipped)"]
    q = r.get("quantization") or {}
    if q:
        lines += ["", "## Quantization", "", f"- int8 layers: {q.get('quantized_layers', 0)}"]
        if q.get("int8_embeddings"):
            lines.append(f"- int8 embedding tables: {', '.join(q['int8_embeddings'])}")
        if "fallback" in q:
            fallen = ", ".join(f"{f['layer']} ({f['snr_db']} dB)" for f in q["fallback"]) or "none needed"
            lines.append(f"- fallback to FP32: {fallen}; predicted drop on calibration data "
                         f"{' -> '.join(f'{t:.4g}' for t in q.get('predicted_drop_trace', []))} "
                         f"(limit {q.get('predicted_drop_limit')})")
        elif q.get("fallback_skipped"):
            lines.append(f"- fallback skipped: {q['fallback_skipped']}")
        if q.get("worst_layers_snr_db"):
            lines.append("- lowest local SNR: " + ", ".join(f"{w['layer']} {w['snr_db']} dB"
                                                          for w in q["worst_layers_snr_db"][:5]))
    sp = r["sparsity"]
    lines += ["", "## Sparsity", "", f"overall {sp['overall']:.4f} of prunable weights", "",
              "| layer | sparsity |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in sp["layers"].items()]
    lines += render_mobile_sections(r)
    if r.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in r["notes"]]
    lines += ["", "## Stages", ""] + [f"- {st['name']} ({st['seconds']:.2f}s): {json.dumps(st['params'])}"
                                      for st in r["stages"]]
    return "\n".join(lines) + "\n"


def write_report(report: dict, outdir: Path) -> None:
    (Path(outdir) / "report.json").write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")
    (Path(outdir) / "report.md").write_text(render_markdown(report))
