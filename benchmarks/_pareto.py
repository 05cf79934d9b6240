"""The Pareto plot of benchmarks/methods.py: speedup vs FP32 at 1 thread (x) against the model's
metric (y), one panel per model, one marker per method, the non-dominated points joined.

Deterministic bytes for the same results (runtime_check.plots: Agg canvas, fixed size and dpi, no
PNG metadata); points are drawn in a fixed method order.
"""
from __future__ import annotations

from pathlib import Path

from _budget import pareto_front
from sqexport.runtime_check.plots import new_figure, save_png

__all__ = ["MARKERS", "plot_pareto"]

# method -> (marker, colour); peers and FP32 in grey tones, structured methods filled, zeros hollow
MARKERS = {
    "fp32": ("*", "#7f7f7f"), "ort-dynamic": ("v", "#8c564b"), "ort-static": ("^", "#8c564b"),
    "none": ("o", "#1f77b4"), "magnitude": ("s", "#ff7f0e"), "nm": ("D", "#bcbd22"),
    "pqi": ("P", "#e377c2"), "structured": ("X", "#2ca02c"), "sensitivity": ("p", "#9467bd"),
    "lowrank": ("h", "#d62728"),
}


def plot_pareto(panels: dict[str, tuple[str, list[dict]]], path: Path) -> None:
    """`panels`: model -> (y-axis label, points); a point is {method, label, speedup, metric}."""
    fig = new_figure(4.2, 6.0 * len(panels))
    for k, (model, (ylabel, points)) in enumerate(panels.items(), 1):
        ax = fig.add_subplot(1, len(panels), k)
        for method, (marker, colour) in MARKERS.items():
            pts = [p for p in points if p["method"] == method]
            if pts:
                ax.scatter([p["speedup"] for p in pts], [p["metric"] for p in pts], marker=marker, color=colour,
                           s=70, label=method, zorder=3, edgecolors="black", linewidths=0.4)
        for p in points:
            ax.annotate(p["label"], (p["speedup"], p["metric"]), textcoords="offset points", xytext=(5, 3),
                        fontsize=7)
        front = [points[i] for i in pareto_front([(p["speedup"], p["metric"]) for p in points])]
        ax.plot([p["speedup"] for p in front], [p["metric"] for p in front], "--", color="#555555",
                linewidth=0.8, zorder=1, label="Pareto front")
        ax.axvline(1.0, color="#bbbbbb", linewidth=0.8, zorder=0)
        ax.set_xlabel("speedup vs FP32, p50 at 1 thread (same run)")
        ax.set_ylabel(ylabel)
        ax.set_title(model)
        ax.grid(True, alpha=0.3)
        ax.margins(0.15)
        ax.legend(loc="best", fontsize=7)
    save_png(fig, path)
