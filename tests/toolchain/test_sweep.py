"""`sqexport sweep` on this machine: a job's folder holds the bytes a single `sqexport export` with
the same options writes; the sweep report; exit codes; reruns skip what is unchanged and rerun what
changed; with --workers a job whose process crashes is retried once and nothing partial is left."""
import json
import shutil
from pathlib import Path

import pytest

from conftest import invoke_cli
from sqexport.contracts.errors import OutputError
from sqexport.contracts.progress import NULL_PROGRESS
from sqexport.toolchain.cli import sweep_jobs
from sqexport.toolchain.sweep import run_sweep
from sweep_hooks import CrashFirst

pytestmark = pytest.mark.e2e

SWEEP = """jobs:
  - {name: mlp, model: digits-mlp, prune: none}
  - {name: mlp-mag, model: digits-mlp, prune: magnitude, sparsity: 0.5, seed: 1}
  - {name: mlp-strict, model: digits-mlp, prune: magnitude, sparsity: 0.5, max_accuracy_drop: 0.0}
"""


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    (tmp / "sweep.yaml").write_text(SWEEP)
    result = invoke_cli(["sweep", tmp / "sweep.yaml", "-o", tmp / "root"])
    single = invoke_cli(["digits-mlp", "--prune", "magnitude", "--sparsity", "0.5", "--seed", "1", "-q",
                         "-o", tmp / "single"])
    assert single.exit_code == 0, single.output
    return tmp, result


def test_job_folder_is_what_a_single_export_writes(swept):
    tmp, _ = swept
    assert (tmp / "root" / "mlp-mag" / "model.onnx").read_bytes() == (tmp / "single" / "model.onnx").read_bytes()
    assert (tmp / "root" / "mlp-mag" / ".sqexport-manifest.json").is_file()


def test_report_and_exit_code_of_a_failed_gate(swept):
    tmp, result = swept
    assert result.exit_code == 1 and "mlp-strict: gate failed" in result.output.strip().splitlines()[-1]
    data = json.loads((tmp / "root" / "sweep.json").read_text())
    rows = {r["name"]: r for r in data["jobs"]}
    assert data["exit_code"] == 1 and data["summary"] == {"jobs": 3, "passed": 2, "failed": 1, "skipped": 0}
    assert rows["mlp"]["passed"] and rows["mlp"]["exit_code"] == 0 and rows["mlp"]["latency_p50_ms"] > 0
    assert rows["mlp-strict"]["status"] == "gate failed" and not rows["mlp-strict"]["passed"]
    assert rows["mlp-mag"]["command"] == "sqexport digits-mlp --prune magnitude --seed 1 --sparsity 0.5"
    md = (tmp / "root" / "sweep.md").read_text()
    assert "| mlp-strict |" in md and "sweep-pareto.png" in md and (tmp / "root" / "sweep-pareto.png").is_file()


def test_rerun_skips_unchanged_jobs_and_reruns_changed_ones(swept, tmp_path):
    """On a copy of the module's sweep: this test edits and reruns it, the others read it."""
    tmp = tmp_path / "sweep"
    shutil.copytree(swept[0], tmp, symlinks=True)
    root = tmp / "root"
    before = (root / "mlp" / "model.onnx").stat().st_mtime_ns
    (root / "mlp-mag" / "report.md").unlink()  # an output no longer matching its manifest
    (tmp / "sweep.yaml").write_text(SWEEP.replace("max_accuracy_drop: 0.0", "max_accuracy_drop: 50.0"))
    data = run_sweep(sweep_jobs(tmp / "sweep.yaml"), root, tmp / "sweep.yaml", _never_for("mlp"), NULL_PROGRESS)
    rows = {r["name"]: r for r in data["jobs"]}
    assert rows["mlp"]["skipped"] and (root / "mlp" / "model.onnx").stat().st_mtime_ns == before
    assert not rows["mlp-mag"]["skipped"] and not rows["mlp-strict"]["skipped"]  # touched, changed spec
    assert rows["mlp-strict"]["passed"] and data["exit_code"] == 0
    # a file changed by someone else is never overwritten, as with `sqexport export -o`
    (root / "mlp" / "report.md").write_text("edited by hand")
    with pytest.raises(OutputError, match="was changed after sqexport wrote it"):
        run_sweep(sweep_jobs(tmp / "sweep.yaml"), root, tmp / "sweep.yaml", _never_for("-"), NULL_PROGRESS)


def _never_for(name):
    from sqexport.toolchain.cli import run_export_job

    def job(argv, outdir):
        assert Path(outdir).name != name, f"{name} should have been skipped"
        return run_export_job(argv, outdir)
    return job


@pytest.mark.slow
def test_workers_retry_a_crashed_job_process_once(tmp_path):
    (tmp_path / "sweep.yaml").write_text("jobs:\n  - {name: a, model: digits-mlp, prune: none}\n"
                                         "  - {name: b, model: digits-mlp, prune: none, seed: 1}\n")
    jobs = sweep_jobs(tmp_path / "sweep.yaml")
    data = run_sweep(jobs, tmp_path / "root", tmp_path / "sweep.yaml", CrashFirst(str(tmp_path / "crashed")),
                     NULL_PROGRESS, workers=2)
    assert data["exit_code"] == 0 and sorted(r["attempts"] for r in data["jobs"]) == [1, 2]
    assert sorted(p.name for p in (tmp_path / "root").iterdir()) == [
        ".sqexport-sweep.json", "a", "b", "sweep-pareto.png", "sweep.json", "sweep.md"]  # no temporary folder
    seq = run_sweep(jobs, tmp_path / "seq", tmp_path / "sweep.yaml", _never_for("-"), NULL_PROGRESS)
    assert seq["exit_code"] == 0
    for name in "ab":
        assert (tmp_path / "root" / name / "model.onnx").read_bytes() == (tmp_path / "seq" / name / "model.onnx").read_bytes()
