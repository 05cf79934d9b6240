"""PNG plots written next to report.md: latency vs metric, per-layer sparsity, per-layer SNR.

Deterministic bytes for the same report: matplotlib's object API on an Agg canvas (no pyplot, no
global backend switch), fixed size and dpi, and no PNG metadata (matplotlib would write its
version under "Software").
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Point", "new_figure", "save_png", "latency_vs_metric", "layer_bars", "pqi_trace", "points_from_report",
           "frontier_points", "write_plots"]

DPI = 100
WIDTH_IN = 7.0
_COLORS = {"baseline": "#7f7f7f", "model": "#1f77b4", "candidate": "#ff7f0e"}


@dataclass(frozen=True)
class Point:
    """One measured model: its p50 latency and its metric value. `kind` is baseline, model or
    candidate (e.g. every model an automatic search measured)."""

    label: str
    latency_ms: float
    metric: float
    kind: str = "candidate"


def new_figure(height_in: float, width_in: float = WIDTH_IN):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(str(path), format="png", dpi=DPI, metadata={"Software": None})


def latency_vs_metric(points: list[Point], metric_label: str, path: Path, title: str = "",
                      xlabel: str = "latency p50 (ms)") -> None:
    """Scatter of p50 latency (x) against the metric (y); every point labelled. Lower-left is
    faster, higher is better for similarity and accuracy metrics."""
    fig = new_figure(4.0)
    ax = fig.add_subplot()
    for kind in ("candidate", "baseline", "model"):  # model drawn last, on top
        pts = [p for p in points if p.kind == kind]
        if pts:
            ax.scatter([p.latency_ms for p in pts], [p.metric for p in pts], s=60 if kind != "candidate" else 30,
                       color=_COLORS.get(kind, "#2ca02c"), label=kind, zorder=3 if kind == "model" else 2)
    for p in points:
        ax.annotate(p.label, (p.latency_ms, p.metric), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(metric_label)
    ax.set_title(title or f"latency vs {metric_label}")
    ax.grid(True, alpha=0.3)
    ax.margins(0.25)
    ax.legend(loc="best", fontsize=8)
    save_png(fig, path)


def layer_bars(values: dict[str, float | None], xlabel: str, path: Path, title: str,
               marks: dict[str, str] | None = None, xlim: tuple[float, float] | None = None) -> None:
    """One horizontal bar per layer, in model order (top to bottom). `marks` annotates layers
    (e.g. "FP32 fallback", "skipped: ..."); a None value is drawn as no bar with its mark."""
    marks = marks or {}
    names = list(values)
    fig = new_figure(max(2.0, 0.6 + 0.22 * len(names)))
    ax = fig.add_subplot()
    ys = list(range(len(names)))[::-1]
    bars = [values[n] if values[n] is not None and math.isfinite(values[n]) else 0.0 for n in names]
    colors = ["#d62728" if n in marks else "#1f77b4" for n in names]
    ax.barh(ys, bars, color=colors, height=0.7)
    ax.set_yticks(ys, names, fontsize=7)
    for y, n, v in zip(ys, names, bars):
        if n in marks:
            ax.annotate(marks[n], (v, y), textcoords="offset points", xytext=(4, -3), fontsize=7, color="#d62728")
    if xlim is not None:
        ax.set_xlim(*xlim)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(True, axis="x", alpha=0.3)
    save_png(fig, path)


def _pqi_value(pqi: dict) -> float:
    """A round's PQI as one number: the global index, or the mean over layers."""
    return pqi["global"] if "global" in pqi else sum(pqi.values()) / max(1, len(pqi))


def pqi_trace(trace: list[dict], path: Path, title: str) -> None:
    """Per prune-recover round: PQI (before the round's pruning) and overall sparsity on the left
    axis, the metric after recovery on the right one, when recovery ran."""
    fig = new_figure(3.5)
    ax = fig.add_subplot()
    rounds = [t["round"] for t in trace]
    ax.plot(rounds, [_pqi_value(t["pqi"]) for t in trace], "o-", color="#1f77b4", label="PQI")
    ax.plot(rounds, [t["sparsity"] for t in trace], "s--", color="#7f7f7f", label="sparsity")
    ax.set_xlabel("round")
    ax.set_ylabel("PQI / sparsity")
    ax.set_xticks(rounds)
    ax.grid(True, alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    metric = [(t["round"], t["metric_after"]) for t in trace if t.get("metric_after") is not None]
    if metric:
        right = ax.twinx()
        right.plot([r for r, _ in metric], [m for _, m in metric], "^-", color="#ff7f0e", label="metric after recovery")
        unit = trace[0].get("unit") or ""
        right.set_ylabel(f"{trace[0].get('metric', 'metric')} ({unit})" if unit else trace[0].get("metric", "metric"))
        h2, l2 = right.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="best", fontsize=8)
    ax.set_title(title)
    save_png(fig, path)


def points_from_report(report: dict) -> list[Point]:
    """Baseline and model at the report's thread count (the latency the gates use)."""
    acc, lat = report["accuracy"], report["latency_ms"]
    if acc.get("baseline") is None or acc.get("model") is None:
        return []
    return [Point("baseline.onnx", lat["baseline"]["p50"], acc["baseline"], "baseline"),
            Point("model.onnx", lat["model"]["p50"], acc["model"], "model")]


def frontier_points(report: dict) -> list[Point]:
    """Every candidate an --auto search measured, at its p50 relative to FP32 (each measured
    interleaved with baseline.onnx in its own run), plus FP32 itself at 1.0."""
    frontier, acc = report.get("frontier") or [], report["accuracy"]
    points = [Point("FP32", 1.0, acc["baseline"], "baseline")] if acc.get("baseline") is not None else []
    for c in frontier:
        if c.get("metric") is not None and c.get("speedup"):
            label = f"{c['sparsity']:g}{' rec' if c['recovered'] else ''} {c['quant']}{' fb' if c['fallback'] else ''}"
            points.append(Point(label, 1.0 / c["speedup"], c["metric"], "model" if c.get("chosen") else "candidate"))
    return points


def _metric_label(acc: dict) -> str:
    unit = acc.get("unit")
    return f"{acc['metric']} ({unit})" if unit else acc["metric"]


def write_plots(report: dict, outdir: Path) -> dict[str, str]:
    """Write every plot the report has data for; returns {plot name: file name in outdir}."""
    outdir, written = Path(outdir), {}
    points = points_from_report(report)
    if points:
        threads = report["latency_ms"]["threads"]
        latency_vs_metric(points, _metric_label(report["accuracy"]), outdir / "latency_vs_metric.png",
                          f"{report['model']}: latency ({threads} thread(s)) vs {report['accuracy']['metric']}")
        written["latency_vs_metric"] = "latency_vs_metric.png"
    frontier = frontier_points(report)
    if len(frontier) > 1:
        latency_vs_metric(frontier, _metric_label(report["accuracy"]), outdir / "frontier.png",
                          f"{report['model']}: --auto frontier (chosen: model)",
                          "p50 latency / FP32 p50 (same run; lower is faster)")
        written["frontier"] = "frontier.png"
    sparsity = report.get("sparsity") or {}
    if sparsity.get("layers") and (sparsity.get("overall") or sparsity.get("skipped")):  # something was pruned
        skipped = {s["layer"]: "skipped" for s in sparsity.get("skipped", [])}
        layer_bars(sparsity["layers"], "fraction of weights that are zero", outdir / "sparsity.png",
                   f"{report['model']}: per-layer sparsity (overall {sparsity['overall']:.3f})", skipped, (0.0, 1.0))
        written["sparsity"] = "sparsity.png"
    if (report.get("pqi") or {}).get("trace"):
        pqi_trace(report["pqi"]["trace"], outdir / "pqi.png",
                  f"{report['model']}: PQI per round ({report['pqi']['scope']} scope)")
        written["pqi"] = "pqi.png"
    quant = report.get("quantization") or {}
    if quant.get("layers_snr_db"):
        fallen = {f["layer"]: "FP32 fallback" for f in quant.get("fallback", [])}
        layer_bars(quant["layers_snr_db"], "local SNR of the int8 layer (dB, higher is better)",
                   outdir / "snr.png", f"{report['model']}: per-layer int8 SNR", fallen)
        written["snr"] = "snr.png"
    return written
