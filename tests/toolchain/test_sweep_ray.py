"""Ray: a sweep on a real local cluster (ray.init(num_cpus=2)) survives a worker killed mid-job and
writes the same bytes as a local sequential run; `--auto --ray local:2` chooses what the local
search chooses (injected latency: file size stands for time) and names the node that timed it."""
import os
import signal
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="ray is not installed: pip install 'sqexport[ray]' (make venv does)")

import sweep_hooks  # noqa: E402
from sqexport.contracts.progress import NULL_PROGRESS  # noqa: E402
from sqexport.toolchain.cli import run_export_job, sweep_jobs  # noqa: E402
from sqexport.toolchain.ray_cluster import parse_ray_address  # noqa: E402
from sqexport.toolchain.sweep import run_sweep  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.e2e]  # a local Ray cluster per module

SWEEP = """jobs:
  - {name: cnn-mag, model: digits-cnn, prune: magnitude, sparsity: 0.5}
  - {name: mlp, model: digits-mlp, prune: none}
  - {name: mlp-mag, model: digits-mlp, prune: magnitude, sparsity: 0.25, calib_data: calib.npy}
  - {name: cnn-dyn, model: digits-cnn, prune: none, quant: int8-dynamic}
"""


def _kill_when_stalled(marker: Path, killed: list, timeout_s: float = 120.0):
    """Test thread: SIGKILL the Ray worker process that claimed the marker, once it has."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if marker.is_file() and marker.read_text():
            pid = int(marker.read_text())
            time.sleep(0.5)  # inside the job now, asleep
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            return


@pytest.fixture(autouse=True, scope="module")
def _hooks_by_value():
    ray.cloudpickle.register_pickle_by_value(sweep_hooks)  # Ray workers cannot import the tests folder
    yield
    ray.cloudpickle.unregister_pickle_by_value(sweep_hooks)


def _no_ray_left():
    assert not ray.is_initialized()


def test_sweep_on_local_ray_survives_a_killed_worker(tmp_path):
    import numpy as np

    from sqexport.models.zoo import load_model

    spec = load_model("digits-mlp")
    np.save(tmp_path / "calib.npy", np.concatenate([next(iter(b.values())) for b in spec.calib_batches])[:64])
    (tmp_path / "sweep.yaml").write_text(SWEEP)
    jobs = sweep_jobs(tmp_path / "sweep.yaml")
    marker, killed = tmp_path / "stalled.pid", []
    killer = threading.Thread(target=_kill_when_stalled, args=(marker, killed), daemon=True)
    killer.start()
    data = run_sweep(jobs, tmp_path / "ray", tmp_path / "sweep.yaml", sweep_hooks.StallFirst(str(marker)),
                     NULL_PROGRESS, ray_target=parse_ray_address("local:2"))
    killer.join(timeout=5)
    _no_ray_left()
    assert killed and killed[0] != os.getpid(), "no worker was killed"
    assert data["exit_code"] == 0 and all(r["passed"] for r in data["jobs"]), data["jobs"]
    assert all("@" in r["where"] for r in data["jobs"])  # the Ray node that ran it
    seq = run_sweep(jobs, tmp_path / "seq", tmp_path / "sweep.yaml", run_export_job, NULL_PROGRESS)
    assert seq["exit_code"] == 0
    for job in jobs:
        assert (tmp_path / "ray" / job.name / "model.onnx").read_bytes() == \
            (tmp_path / "seq" / job.name / "model.onnx").read_bytes(), job.name
    assert not [p for p in (tmp_path / "ray").iterdir() if ".tmp-" in p.name]


def test_auto_on_ray_chooses_what_the_local_search_chooses(tmp_path):
    from sqexport.models.zoo import load_model
    from sqexport.toolchain.auto_ray import run_auto_on_ray
    from sqexport.toolchain.overrides import Overrides, apply_overrides
    from sqexport.toolchain.search import AutoConfig, run_auto

    spec = load_model("digits-cnn")
    recipe = apply_overrides(None, Overrides(seed=0, target="cpu", max_accuracy_drop=2.0))
    config = AutoConfig(minutes=10, levels=(0.0, 0.25, 0.5), recover=False)
    local = run_auto(recipe, spec, tmp_path / "local", config=config, latency=sweep_hooks.latency_by_size)
    remote = run_auto_on_ray("local:2", recipe, spec, tmp_path / "ray", NULL_PROGRESS, config, sweep_hooks.latency_by_size)
    _no_ray_left()
    assert remote["auto"]["chosen"] == local["auto"]["chosen"]
    assert [c["id"] for c in remote["frontier"]] == [c["id"] for c in local["frontier"]]
    assert (tmp_path / "ray" / "model.onnx").read_bytes() == (tmp_path / "local" / "model.onnx").read_bytes()
    info = remote["auto"]["ray"]
    assert info["latency_resource"] == "sqexport-target-cpu" and info["latency_measured_on"]
    assert all(c["latency_node"] in info["latency_measured_on"] for c in remote["frontier"])
