"""Sweep jobs as Ray tasks (`sqexport sweep --ray ...`).

A task may run on a node that shares no file system with this one, so nothing travels as a path:
every input file or folder a job names (model file, data, recipe) is put into Ray's object store
once for the whole sweep and written out on the node that needs it, and the finished output
folder comes back as bytes, committed here into ROOT/<name> through the same atomic output folder
as `sqexport export`. A task whose worker dies is retried by Ray (`max_retries`); Ctrl-C cancels
every task (force: the workers are killed) and, since nothing is committed before a task returns,
leaves no partial folder in ROOT.
"""
from __future__ import annotations

import io
import os
import shutil
import tarfile
import tempfile
import time
import uuid
from pathlib import Path
from typing import Sequence

from sqexport.contracts.errors import first_line
from sqexport.toolchain import signals
from sqexport.toolchain.output_folder import MANIFEST, atomic_output
from sqexport.toolchain.ray_cluster import node_label, torch_threads_like_cli
from sqexport.toolchain.sweep_local import Events, JobFn
from sqexport.toolchain.sweep_spec import Job
from sqexport.toolchain.sweep_state import Outcome

__all__ = ["run_ray", "MAX_RETRIES"]

MAX_RETRIES = 2  # a task whose worker process dies runs again, up to twice
_POLL_S = 1.0


def _pack(path: Path) -> tuple[str, str, bytes]:
    """(kind, name, bytes): a file as it is, a folder as an uncompressed tar."""
    if path.is_dir():
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            tar.add(path, arcname=path.name)
        return "dir", path.name, buf.getvalue()
    return "file", path.name, path.read_bytes()


def _unpack(packed: tuple[str, str, bytes], folder: Path) -> Path:
    kind, name, data = packed
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "dir":
        with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
            tar.extractall(folder, filter="data")
    else:
        (folder / name).write_bytes(data)
    return folder / name


def _read_folder(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _scratch(sweep_id: str) -> Path:
    return Path(tempfile.gettempdir()) / f"sqexport-sweep-{sweep_id}"


def _job_task(job_fn: JobFn, argv: list[str], staged: dict, name: str, sweep_id: str, omp: str | None):
    """Runs on a Ray worker: inputs from the object store, the job, its folder back as bytes."""
    import ray

    t0 = time.monotonic()
    torch_threads_like_cli(omp)
    base = _scratch(sweep_id)
    for old in base.glob(f"{name}.*"):  # an earlier attempt of this job here was killed
        shutil.rmtree(old, ignore_errors=True)
    work = base / f"{name}.{uuid.uuid4().hex[:8]}"
    try:
        argv = list(argv)
        for index, ref in staged.items():
            argv[index] = str(_unpack(ray.get(ref), work / "inputs" / str(index)))
        out = work / "out"
        code, message = job_fn(argv, str(out))
        files = _read_folder(out) if (out / MANIFEST).is_file() else None
        return code, message.replace(str(out), "{outdir}"), files, node_label(), round(time.monotonic() - t0, 2)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _commit(outdir: Path, files: dict[str, bytes]) -> None:
    """The task's folder, written here exactly; atomic_output writes the manifest again (the same
    files give the same manifest)."""
    with atomic_output(outdir) as tmp:
        for rel, data in files.items():
            if rel != MANIFEST:
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                (tmp / rel).write_bytes(data)


def run_ray(jobs: Sequence[Job], root: Path, job_fn: JobFn, events: Events) -> None:
    """Every job as a Ray task (Ray must be initialised: toolchain.ray_cluster.ray_cluster); as
    many in flight as the cluster has CPUs, so 'running' means running."""
    import ray

    sweep_id = uuid.uuid4().hex[:12]
    # each distinct input once into the object store, whatever number of jobs read it
    refs: dict[str, object] = {}
    for job in jobs:
        for i in job.paths:
            if job.argv[i] not in refs:
                refs[job.argv[i]] = ray.put(_pack(Path(job.argv[i])))
    task = ray.remote(_job_task).options(num_cpus=1, max_retries=MAX_RETRIES, retry_exceptions=False)
    slots = max(1, int(ray.cluster_resources().get("CPU", 1)))
    omp = os.environ.get("OMP_NUM_THREADS")
    todo, pending = list(jobs), {}
    try:
        while todo or pending:
            while todo and len(pending) < slots:
                job = todo.pop(0)
                events.started(job, 1)
                staged = {i: refs[job.argv[i]] for i in job.paths}
                pending[task.remote(job_fn, list(job.argv), staged, job.name, sweep_id, omp)] = job
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=_POLL_S)
            for ref in ready:
                job = pending.pop(ref)
                events.finished(job, _finish(ref, job, root))
            signals.check()
    finally:
        with signals.deferred():
            for ref in pending:
                ray.cancel(ref, force=True)
            shutil.rmtree(_scratch(sweep_id), ignore_errors=True)  # this node's share; workers clean theirs


def _finish(ref, job: Job, root: Path) -> Outcome:
    import ray

    try:
        code, message, files, where, seconds = ray.get(ref)
    except ray.exceptions.RayError as exc:  # retries used up, or the task itself broke
        return Outcome(job.name, -1, f"Ray task failed: {first_line(exc)}")
    if files is not None:
        _commit(root / job.name, files)
    return Outcome(job.name, code, message.replace("{outdir}", str(root / job.name)), seconds, where=where)
