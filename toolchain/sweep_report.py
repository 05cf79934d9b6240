"""The sweep's own report in ROOT: sweep.json, sweep.md and sweep-pareto.png (latency vs metric,
one panel per model, the non-dominated jobs joined). Each job's numbers come from its own
report.json, so a skipped job (output unchanged since an earlier run) is reported like a run one."""
from __future__ import annotations

import json
import math
from pathlib import Path

from sqexport.toolchain.sweep_progress import verdict
from sqexport.toolchain.sweep_spec import Job
from sqexport.toolchain.sweep_state import Outcome, write_atomic

__all__ = ["REPORT_FILES", "job_row", "write_sweep_report", "pareto_front"]

REPORT_FILES = ("sweep.json", "sweep.md", "sweep-pareto.png")


def _report(outdir: Path) -> dict | None:
    try:
        return json.loads((outdir / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def job_row(job: Job, outcome: Outcome, root: Path) -> dict:
    """One job: its command, verdict, and the headline numbers of its report (if it wrote one)."""
    rep = _report(root / job.name) if outcome.exit_code in (0, 1) else None
    row = {"name": job.name, "model": job.model, "command": job.command, "options": job.options,
           "spec_hash": job.spec_hash, **outcome.as_dict(), "status": verdict(outcome)}
    if rep:
        acc, lat = rep.get("accuracy") or {}, rep.get("latency_ms") or {}
        row.update({"passed": bool(rep.get("passed")),
                    "checks": [{k: c.get(k) for k in ("name", "passed", "value", "limit")} for c in rep.get("checks", [])],
                    "metric_name": acc.get("metric"), "metric": acc.get("model"), "metric_unit": acc.get("unit"),
                    "drop": acc.get("drop"), "latency_p50_ms": (lat.get("model") or {}).get("p50"),
                    "baseline_p50_ms": (lat.get("baseline") or {}).get("p50"), "speedup": lat.get("speedup"),
                    "threads": lat.get("threads"), "size_bytes": (rep.get("size_bytes") or {}).get("model"),
                    "sparsity": (rep.get("sparsity") or {}).get("overall")})
    else:
        row["passed"] = False
    return row


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both lower latency and higher metric,
    ordered by latency."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def _plot(rows: list[dict], path: Path) -> bool:
    from sqexport.runtime_check.plots import new_figure, save_png

    models = sorted({r["model"] for r in rows if r.get("latency_p50_ms") is not None and r.get("metric") is not None})
    if not models:
        return False
    fig = new_figure(4.0, max(5.0, 4.5 * len(models)))
    for k, model in enumerate(models, 1):
        pts = [r for r in rows if r["model"] == model and r.get("latency_p50_ms") is not None
               and r.get("metric") is not None]
        ax = fig.add_subplot(1, len(models), k)
        for passed, colour in ((True, "#2ca02c"), (False, "#d62728")):
            sel = [r for r in pts if r["passed"] is passed]
            if sel:
                ax.scatter([r["latency_p50_ms"] for r in sel], [r["metric"] for r in sel], color=colour, s=40,
                           zorder=3, label="passed its gates" if passed else "gate failed")
        for r in pts:
            ax.annotate(r["name"], (r["latency_p50_ms"], r["metric"]), textcoords="offset points", xytext=(5, 3),
                        fontsize=7)
        front = [pts[i] for i in pareto_front([(r["latency_p50_ms"], r["metric"]) for r in pts])]
        ax.plot([r["latency_p50_ms"] for r in front], [r["metric"] for r in front], "--", color="#555555",
                linewidth=0.8, zorder=1, label="Pareto front")
        ax.set_xlabel("model.onnx latency p50 (ms)")
        ax.set_ylabel(f"{pts[0].get('metric_name')} ({pts[0].get('metric_unit') or ''})")
        ax.set_title(model)
        ax.grid(True, alpha=0.3)
        ax.margins(0.15)
        ax.legend(loc="best", fontsize=7)
    save_png(fig, path)
    return True


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _markdown(data: dict, plotted: bool) -> str:
    lines = [f"# sqexport sweep: {data['sweep_file']}", "",
             f"{data['summary']['jobs']} job(s): {data['summary']['passed']} passed, "
             f"{data['summary']['failed']} failed, {data['summary']['skipped']} skipped (unchanged); "
             f"run {data['runner']}; exit code {data['exit_code']}.", "",
             "| job | model | status | exit | metric | drop | p50 ms | speedup | size B | seconds | where |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["jobs"]:
        failed = ", ".join(c["name"] for c in r.get("checks", []) if not c["passed"])
        lines.append(f"| {r['name']} | {r['model']} | {r['status']}{' (' + failed + ')' if failed else ''}"
                     f"{' (skipped)' if r['skipped'] else ''} | {r['exit_code']} | {_fmt(r.get('metric'), '.3f')} | "
                     f"{_fmt(r.get('drop'), '.3f')} | {_fmt(r.get('latency_p50_ms'), '.3f')} | "
                     f"{_fmt(r.get('speedup'), '.2f')} | {_fmt(r.get('size_bytes'), ',')} | {r['seconds']} | "
                     f"{r.get('where') or '-'} |")
    lines += ["", "Commands (each job's folder is what this command writes):", ""]
    lines += [f"- `{r['name']}`: `{r['command']} -o ROOT/{r['name']}`" for r in data["jobs"]]
    problems = [r for r in data["jobs"] if r["exit_code"] not in (0, 1)]
    if problems:
        lines += ["", "Errors:", ""] + [f"- `{r['name']}`: {r['message']}" for r in problems]
    if plotted:
        lines += ["", "Latency vs metric per model (dashed: the Pareto front):", "", "![pareto](sweep-pareto.png)"]
    return "\n".join(lines) + "\n"


def write_sweep_report(root: Path, sweep_file: Path, rows: list[dict], runner: str, exit_code: int) -> dict:
    data = {"tool": "sqexport", "sweep_file": str(sweep_file), "runner": runner, "exit_code": exit_code,
            "summary": {"jobs": len(rows), "passed": sum(r["passed"] for r in rows),
                        "failed": sum(not r["passed"] for r in rows), "skipped": sum(r["skipped"] for r in rows)},
            "jobs": rows}
    plotted = _plot(rows, root / "sweep-pareto.png")
    write_atomic(root / "sweep.json", json.dumps(data, indent=1, default=str) + "\n")
    write_atomic(root / "sweep.md", _markdown(data, plotted))
    return data
