"""Report -> report.json and report.md."""
from __future__ import annotations

import json
from pathlib import Path

from sqexport.contracts.units import format_value
from sqexport.runtime_check.other_outputs import describe
from sqexport.runtime_check.plots import write_plots
from sqexport.runtime_check.report_mobile import render_mobile_sections
from sqexport.runtime_check.report_schema import SCHEMA_VERSION, schema_errors, strict_reports

__all__ = ["write_report", "render_markdown"]


def _stage_cost(stage: dict) -> str:
    peak = stage.get("peak_rss_mb")
    return f"{stage['seconds']:.2f} s" + (f", peak RSS {peak:,.0f} MB" if peak is not None else "")


def render_markdown(r: dict) -> str:
    lines = [f"# sqexport report: {r['model']} ({r['target']})", "",
             f"**{'PASSED' if r['passed'] else 'FAILED'}**", ""]
    lines += ["## Checks", "", "| check | value | limit | passed |", "|---|---|---|---|"]
    lines += [f"| {c['name']} | {format_value(c['value'], c['unit'])} | {format_value(c['limit'], c['unit'])} | "
              f"{'yes' if c['passed'] else 'NO'} |" for c in r["checks"]] or ["| (no gates) | | | |"]
    notes = [f"- {c['name']}: {c['note']}" for c in r["checks"] if c.get("note")]
    lines += [""] + notes if notes else []
    acc = r["accuracy"]
    unit = acc["unit"]
    lines += ["", "## Accuracy", "", f"metric `{acc['metric']}`: baseline {format_value(acc['baseline'], unit)}, "
              f"model {format_value(acc['model'], unit)}, drop {format_value(acc['drop'], acc['drop_unit'])}"]
    if acc.get("evidence"):
        lines.append(f"- evidence: {acc['evidence']}")
    sc = r.get("sparsity_choice")
    if sc:
        lines.append(f"- sparsity {sc['chosen']:.2f} chosen: {sc['why']} (tried "
                     + ", ".join(f"{t['sparsity']:.2f}: {t['drop']:.4g}"
                                 + (f" / cosine {t['cosine']:.4f}" if "cosine" in t else "") for t in sc["tried"]) + ")")
    if acc.get("pooling"):
        pl = acc["pooling"]
        lines.append(f"- pooling: {' + '.join(pl['modes'])}{', L2-normalized' if pl['normalize'] else ''} "
                     f"({pl['source']})" + (f"; model.onnx output `{pl['onnx_output']}`" if pl.get("onnx_output") else ""))
    if acc["metric"] in ("top1_expected", "top1_agreement"):
        lines.append(f"- **{acc.get('note', 'no labels: compared with FP32')}**; top-5 agreement compares the "
                     "top-5 class sets, KL is KL(FP32 softmax || model softmax)")
    for k, k_unit in (("min_cosine", unit), ("spearman", ""), ("agreement_with_baseline", unit),
                      ("top5_agreement", unit), ("kl_to_baseline", "nats")):
        if k in acc:
            lines.append(f"- {k}: {format_value(acc[k], k_unit)}")
    for other in acc.get("other_outputs", []):  # the gate reads the first output only
        lines.append(f"- output `{other['name']}` (not gated): {describe(other)}")
    if "max_abs_deviation" in r.get("fidelity", {}):
        f = r["fidelity"]
        covered = f" on {f['samples']} of {f['eval_samples']} evaluation samples" if "samples" in f else ""
        lines.append(f"- onnxruntime vs torch quantized model{covered}: max |deviation| {f['max_abs_deviation']:.3g}"
                     + (f", argmax agreement {f['argmax_agreement']:.4f}" if "argmax_agreement" in f else ""))
    lines += _data_lines(r)
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
        cov = q.get("coverage") or {}
        if cov:
            lines.append(f"- weight layers in the graph: {cov['weight_layers']}, int8 {cov['int8']}, "
                         f"FP32 {len(cov['fp32'])}")
            lines += [f"  - FP32 `{f.get('layer') or f['node']}` ({f['op']}): {f['reason']}" for f in cov["fp32"]]
            products = cov.get("activation_matmuls_fp32") or []
            if products:  # one reason for all: list the nodes once
                shown = ", ".join(f"`{p_['node']}`" for p_ in products[:6]) + (", ..." if len(products) > 6 else "")
                lines.append(f"- activation x activation products (attention) in FP32: {len(products)} ({shown}): "
                             f"{products[0]['reason']}")
        if q.get("int8_embeddings"):
            lines.append(f"- int8 embedding tables: {', '.join(q['int8_embeddings'])}")
        if "fallback" in q:
            fallen = ", ".join(f"{f['layer']} ({f['snr_db']} dB)" for f in q["fallback"]) or "none needed"
            lines.append(f"- fallback to FP32: {fallen}; predicted drop on calibration data "
                         f"{' -> '.join(format_value(t, acc['drop_unit']) for t in q.get('predicted_drop_trace', []))} "
                         f"(limit {format_value(q.get('predicted_drop_limit'), acc['drop_unit'])})")
            confirmation = q.get("fallback_confirmation")
            if confirmation:
                measured = " -> ".join(f"{format_value(m['drop'], acc['drop_unit'])} with "
                                       f"{m['fallback_layers']} fallback layer(s)" for m in confirmation["measured"])
                lines.append(f"- measured on the evaluation split ({confirmation['samples']} samples, the exported "
                             f"graph in onnxruntime): {measured}"
                             + (f"; {confirmation['added_layers']} more layer(s) returned to FP32, so the gate is "
                                "not a held-out measurement" if confirmation["added_layers"] else ""))
            floor = q.get("fidelity_floor")
            if floor:
                measured = " -> ".join(f"{m['cosine']:.5f} with {m['fallback_layers']}" for m in floor["measured"])
                lines.append(f"- fidelity floor (cosine >= {floor['min_cosine']:g} to FP32 on {floor.get('samples', '?')} "
                             f"calibration samples, at most {floor['max_mac_share']:.0%} of the multiply-accumulates "
                             f"in FP32): {measured} FP32 layer(s); "
                             + (f"{floor['added_layers']} layer(s) added for it" if floor["added_layers"] else
                                "reached with the gate's layers" if floor["reached"] else "not reachable, none added"))
        elif q.get("fallback_skipped"):
            lines.append(f"- fallback skipped: {q['fallback_skipped']}")
        if q.get("worst_layers_snr_db"):
            lines.append("- lowest local SNR: " + ", ".join(f"{w['layer']} {w['snr_db']} dB"
                                                          for w in q["worst_layers_snr_db"][:5]))
    sp = r["sparsity"]
    why = {s["layer"]: f"skipped by {s['stage']}: {s['reason']}" for s in sp.get("skipped", [])}
    lines += ["", "## Sparsity", "", f"overall {sp['overall']:.4f} of prunable weights", "",
              "| layer | sparsity | note |", "|---|---|---|"]
    lines += [f"| {k} | {v:.4f} | {why.get(k, '')} |" for k, v in sp["layers"].items()]
    lines += render_mobile_sections(r)
    if r.get("pqi"):
        lines += _pqi_lines(r["pqi"])
    if r.get("frontier"):
        lines += _frontier_lines(r)
    if r.get("plots"):
        lines += _plots_section(r["plots"])
    if r.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in r["notes"]]
    lines += ["", "## Stages", ""] + [f"- {st['name']} ({_stage_cost(st)}): {json.dumps(st['params'])}"
                                      for st in r["stages"]]
    return "\n".join(lines) + "\n"


def _pqi_lines(pqi: dict) -> list[str]:
    """The PQI trace: per round the index before pruning, what was pruned and the metric after recovery."""
    lines = ["", "## PQI / SAP rounds", "",
             f"scope {pqi['scope']}, p {pqi['p']}, q {pqi['q']}; stopped by {pqi['stopped']}; "
             f"sparsity {pqi['sparsity']:.4f} (unstructured: size, not speed)", "",
             "| round | PQI | pruned | sparsity | metric before -> after recovery |", "|---|---|---|---|---|"]
    for t in pqi["trace"]:
        index = t["pqi"]
        value = index["global"] if "global" in index else sum(index.values()) / max(1, len(index))
        metric = (f"{t['metric_before']:.4g} -> {t['metric_after']:.4g} {t.get('unit') or ''}"
                  if t.get("metric_after") is not None else "no recovery")
        lines.append(f"| {t['round']}{' (undone)' if t.get('undone') else ''} | {value:.4f}"
                     f"{'' if 'global' in index else ' (mean)'} | {t['pruned']:,} | {t['sparsity']:.4f} | {metric} |")
    return lines


def _frontier_lines(r: dict) -> list[str]:
    """Every --auto candidate: settings, p50 ratio vs FP32, metric, pass/fail, seconds spent."""
    auto = r.get("auto") or {}
    lines = ["", "## --auto search", "", f"- chosen: {auto.get('chosen')}: {auto.get('why', '')}",
             f"- stopped: {auto.get('stopped', '')}",
             f"- budget {auto.get('budget_minutes')} min, spent {auto.get('seconds')} s", "",
             "| candidate | sparsity | recovered | quant | fallback layers | speedup (p50) | metric | drop | passed "
             "| seconds |", "|---|---|---|---|---|---|---|---|---|---|"]
    for c in r["frontier"]:
        mark = " **(chosen)**" if c.get("chosen") else ""
        lines.append(f"| {c['id']}{mark} | {c['sparsity']:g} | {'yes' if c['recovered'] else 'no'} | {c['quant']} | "
                     f"{c['fallback_layers'] if c['fallback'] else '-'} | {c['speedup']:.2f}x ({c['threads']} thr) | "
                     f"{format_value(c['metric'], c.get('unit') or '')} | {format_value(c['drop'], c.get('drop_unit') or '')} | "
                     f"{'yes' if c['passed'] else 'no: ' + ', '.join(c['failed_checks'])} | {c['seconds']:.1f} |")
    for s in auto.get("skipped", []):
        lines.append(f"| {s['id']} | | | | | skipped | | | {s['reason']} | |")
    return lines


_DATA_KEYS = ("source", "split", "format", "samples", "layout", "labels", "class_names", "size", "resize",
              "channels", "color", "scale", "mean", "std", "distribution")


def _data_lines(r: dict) -> list[str]:
    """Where the calibration and eval data came from and how they were preprocessed."""
    data = r.get("data") or {}
    lines = []
    if r.get("source"):
        src = r["source"]
        lines += ["", "## Model", "", f"- {src.get('kind')} `{src.get('ref')}`; example input(s) "
                  + ", ".join(f"`{n}` {'x'.join(map(str, s))}" for n, s in src.get("input_shapes", {}).items())
                  + " (batch dimension dynamic in the ONNX export)",
                  f"- task: {src.get('task_from')}"]
    splits = [s for s in ("calib", "eval") if s in data]
    if not splits:
        return lines
    lines += ["", "## Data", ""]
    for note in data.get("notes", []):
        lines.append(f"**{note}**")
        lines.append("")
    lines += ["| | " + " | ".join(splits) + " |", "|---|" + "---|" * len(splits)]
    for key in _DATA_KEYS:
        if any(key in data[s] for s in splits):
            cells = [_cell(data[s].get(key, ""), key) for s in splits]
            lines.append(f"| {key.replace('_', ' ')} | " + " | ".join(cells) + " |")
    return lines


def _cell(value, key: str = "") -> str:
    if key == "size" and isinstance(value, list):
        return "x".join(map(str, value))
    if isinstance(value, list):
        return ", ".join((format_value(v, "") if isinstance(v, float) else str(v)) for v in value) or "none"
    return str(value).replace("|", "/")


def _plots_section(plots: dict[str, str]) -> list[str]:
    titles = {"latency_vs_metric": "Latency vs metric", "frontier": "--auto frontier: latency vs metric",
              "sparsity": "Per-layer sparsity", "snr": "Per-layer int8 SNR", "pqi": "PQI per round"}
    lines = ["", "## Plots", ""]
    for name, file in plots.items():
        lines += [f"![{titles.get(name, name)}]({file})", ""]
    return lines[:-1]


def write_report(report: dict, outdir: Path) -> None:
    """report.json, report.md and the PNG plots it links (report["plots"] names them).

    The report is checked against its JSON Schema first: a deviation is a bug of ours, an error
    under SQEXPORT_STRICT_REPORT=1 (the tests) and otherwise a note in the report, so a user's
    run still ends with its files while tools reading report.json are told."""
    report["plots"] = write_plots(report, outdir)
    report.setdefault("schema_version", SCHEMA_VERSION)
    errors = schema_errors(report)
    if errors and strict_reports():
        raise AssertionError("report.json deviates from its schema: " + "; ".join(errors))
    if errors:
        report["notes"] = list(report.get("notes", [])) + [f"report.json deviates from its schema ({SCHEMA_VERSION}): "
                                                            + "; ".join(errors)]
    (Path(outdir) / "report.json").write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")
    (Path(outdir) / "report.md").write_text(render_markdown(report))
