"""`--auto` on digits-cnn with an injected latency (file size stands for time), so the choice is
deterministic and no timing runs: the fastest passing candidate wins, the scan stops at the first
level that fails accuracy, the frontier lands in report.json, and nothing passing means passed=false.
Through the CLI: exit 1 with the report written, and one-line exit-2 errors for clashing flags."""
import json

import pytest

from sqexport.models.zoo import load_model
from sqexport.toolchain.overrides import Overrides, apply_overrides
from sqexport.toolchain.search import AutoConfig, run_auto


def _latency_by_size(baseline, model):
    """Deterministic stand-in for timing: p50 proportional to the file size."""
    base, m = baseline.stat().st_size / 1e5, model.stat().st_size / 1e5
    return {"threads": 1, "baseline": {"p50": base}, "model": {"p50": m}, "speedup": base / m}


@pytest.fixture(scope="module")
def spec():
    return load_model("digits-cnn")


def _run(spec, out, levels=(0.0, 0.25, 0.5, 0.75), **gates):
    recipe = apply_overrides(None, Overrides(seed=0, target="cpu", **gates))
    config = AutoConfig(minutes=10, levels=levels, recover=False)
    return run_auto(recipe, spec, out, config=config, latency=_latency_by_size)


@pytest.fixture(scope="module")
def searched(spec, tmp_path_factory):
    out = tmp_path_factory.mktemp("auto") / "out"
    return out, _run(spec, out, max_accuracy_drop=2.0)


def test_fastest_passing_candidate_is_chosen(searched):
    out, rep = searched
    frontier = {c["id"]: c for c in rep["frontier"]}
    passing = [c for c in frontier.values() if c["passed"]]
    chosen = [c for c in frontier.values() if c["chosen"]]
    assert len(chosen) == 1 and chosen[0]["passed"]
    assert chosen[0]["speedup"] == max(c["speedup"] for c in passing)
    assert rep["auto"]["chosen"] == chosen[0]["id"] and "fastest of" in rep["auto"]["why"]
    # the chosen candidate is the output folder's model, verified like any run
    assert rep["passed"] and (out / "model.onnx").is_file() and not (out / "candidates").exists()
    prune = [st for st in rep["recipe"]["stages"] if st["type"] == "prune.structured"]
    assert (prune[0]["params"]["sparsity"] if prune else 0.0) == chosen[0]["sparsity"]


def test_scan_stops_at_first_level_failing_accuracy(searched):
    _, rep = searched
    levels = sorted({c["sparsity"] for c in rep["frontier"]})
    failed = [s for s in levels if not any(c["accuracy_passed"] for c in rep["frontier"] if c["sparsity"] == s)]
    assert failed == [levels[-1]] and 0.75 not in levels  # digits-cnn at 0.5 without recovery: ~77% top-1
    assert "assumed no better" in rep["auto"]["stopped"]
    # plain int8 failing accuracy is retried with fallback; dense (level 0) has no FP32 candidate
    ids = [c["id"] for c in rep["frontier"]]
    fallback = f"s{levels[-1]:g}-int8-fallback"  # tried; measured unless it changed nothing
    assert "s0-int8" in ids and "s0-none" not in ids
    assert fallback in ids or any(s["id"] == fallback for s in rep["auto"]["skipped"])


def test_frontier_fields_and_report_md(searched):
    out, rep = searched
    for c in rep["frontier"]:
        assert {"sparsity", "quant", "fallback", "speedup", "metric", "drop", "passed", "seconds"} <= set(c)
        assert c["seconds"] >= 0
    saved = json.loads((out / "report.json").read_text())
    assert saved["frontier"] == rep["frontier"]
    md = (out / "report.md").read_text()
    assert "## --auto search" in md and "(chosen)" in md and "frontier.png" in md
    assert (out / "frontier.png").is_file()


def test_nothing_passing_writes_the_closest_and_fails(spec, tmp_path):
    rep = _run(spec, tmp_path / "o", (0.0,), max_accuracy_drop=2.0, min_speedup=1000.0)
    assert not rep["passed"] and not any(c["passed"] for c in rep["frontier"])
    assert "no candidate passed" in rep["auto"]["why"]
    assert (tmp_path / "o" / "report.json").is_file()


@pytest.mark.slow
@pytest.mark.e2e
def test_cli_exit_1_when_nothing_passes(run_cli, tmp_path):
    res = run_cli(["digits-cnn", "--auto", "--auto-minutes", "0.01", "--min-speedup", "1000", "-q",
                   "-o", tmp_path / "o"])
    assert res.exit_code == 1, res.output
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    assert rep["frontier"] and not rep["passed"]


@pytest.mark.parametrize("args, message", [
    (["--auto", "--prune", "structured"], "--auto chooses"),
    (["--auto", "--sparsity", "0.5", "--quant", "int8"], "--sparsity, --quant"),
    (["--auto", "--recover-steps", "3"], "--recover-steps"),
    (["--auto-minutes", "3"], "--auto-minutes needs --auto"),
    (["--auto", "--auto-minutes", "0"], "must be a finite number > 0"),
])
def test_auto_flag_errors(run_cli, tmp_path, args, message):
    res = run_cli(["digits-cnn", *args, "-o", tmp_path / "o"])
    assert res.exit_code == 2 and message in res.output, res.output
    assert len([line for line in res.output.splitlines() if line.startswith("Error")]) == 1
    assert not (tmp_path / "o").exists()
