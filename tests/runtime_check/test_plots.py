"""Plots beside report.md: real PNGs of a fixed size, byte-identical for the same data, linked from
report.md with relative paths."""
from __future__ import annotations

import re

from PIL import Image

from sqexport.runtime_check.plots import DPI, WIDTH_IN, Point, latency_vs_metric, layer_bars, write_plots
from sqexport.runtime_check.report import render_markdown


def _report(**extra):
    r = {"model": "tiny", "target": "cpu", "passed": True,
         "accuracy": {"metric": "top1", "unit": "%", "baseline": 98.0, "model": 97.0, "drop": 1.0, "drop_unit": "points"},
         "latency_ms": {"threads": 1, "baseline": {"p50": 2.0, "p90": 2.2}, "model": {"p50": 1.0, "p90": 1.1},
                        "speedup": 2.0},
         "sparsity": {"overall": 0.4, "layers": {"conv": 0.0, "fc": 0.5},
                      "skipped": [{"layer": "conv", "stage": "prune.nm", "reason": "1 input channel(s)"}]},
         "quantization": {"layers_snr_db": {"conv": 31.5, "fc": None}, "fallback": [{"layer": "fc", "snr_db": 12.0}]}}
    r.update(extra)
    return r


def test_latency_vs_metric_takes_any_number_of_points_and_is_deterministic(tmp_path):
    points = [Point("baseline.onnx", 2.0, 0.98, "baseline"), Point("model.onnx", 1.0, 0.97, "model"),
              Point("50% sparse", 1.2, 0.975), Point("int8 only", 0.9, 0.96)]
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    latency_vs_metric(points, "top1", a)
    latency_vs_metric(points, "top1", b)
    data = a.read_bytes()
    assert data == b.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and b"Software" not in data and b"matplotlib" not in data
    with Image.open(a) as img:
        assert img.size == (int(WIDTH_IN * DPI), 400)


def test_layer_bars_grow_with_the_number_of_layers(tmp_path):
    few, many = tmp_path / "few.png", tmp_path / "many.png"
    layer_bars({"a": 0.5, "b": 0.1}, "sparsity", few, "t")
    layer_bars({f"layer{i}": i / 40 for i in range(40)}, "sparsity", many, "t", {"layer3": "skipped"})
    with Image.open(few) as f, Image.open(many) as m:
        assert f.size[0] == m.size[0] and m.size[1] > f.size[1]


def test_write_plots_writes_what_the_report_has_data_for(tmp_path):
    assert write_plots(_report(), tmp_path) == {"latency_vs_metric": "latency_vs_metric.png",
                                                "sparsity": "sparsity.png", "snr": "snr.png"}
    bare = tmp_path / "bare"
    bare.mkdir()
    unpruned = {"overall": 0.0, "layers": {"conv": 0.0}, "skipped": []}
    assert write_plots(_report(sparsity=unpruned, quantization={}), bare) == {
        "latency_vs_metric": "latency_vs_metric.png"}
    assert sorted(p.name for p in bare.iterdir()) == ["latency_vs_metric.png"]


def test_report_md_links_plots_relatively_and_notes_skipped_layers(tmp_path):
    r = _report()
    r.update(size_bytes={"baseline": 10, "model": 5, "compressed": 4}, checks=[], stages=[], notes=[])
    r["plots"] = write_plots(r, tmp_path)
    md = render_markdown(r)
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert links == ["latency_vs_metric.png", "sparsity.png", "snr.png"]
    assert all((tmp_path / link).is_file() for link in links)
    assert "| conv | 0.0000 | skipped by prune.nm: 1 input channel(s) |" in md


def test_default_export_links_its_plots(default_export):
    out, report = default_export.out, default_export.report
    md = (out / "report.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted(links) == sorted(report["plots"].values()) == ["latency_vs_metric.png", "snr.png", "sparsity.png"]
    for link in links:
        with Image.open(out / link) as img:
            assert img.format == "PNG"
    assert set(report["quantization"]["layers_snr_db"]) == set(report["sparsity"]["layers"])
