"""`sqexport sweep`: many exports, each into ROOT/<name>, skipping those already done, then one
report over all of them. Where the jobs run (this process, worker processes, a Ray cluster) is the
executor's business (sweep_local, sweep_ray); this module checks the outputs up front, keeps the
sweep state current as jobs finish, and decides the exit code.

Exit code: 0 every job passed its gates; 1 a job failed a gate (its folder and report are
written); 2 a job found bad input only when it ran (e.g. a data file that does not load); 3 a job
hit an internal error or its process kept dying.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from sqexport.contracts.errors import ConfigError
from sqexport.contracts.progress import Progress
from sqexport.toolchain.output_folder import MANIFEST, check_output, resolve_output
from sqexport.toolchain.sweep_local import JobFn, run_processes, run_sequential
from sqexport.toolchain.sweep_progress import Tally
from sqexport.toolchain.sweep_report import REPORT_FILES, job_row, write_sweep_report
from sqexport.toolchain.sweep_spec import Job
from sqexport.toolchain.sweep_state import STATE_FILE, Outcome, load_state, record, reusable

__all__ = ["run_sweep", "check_root", "exit_code_of"]


def check_root(root: Path, jobs: Sequence[Job]) -> Path:
    """Fail before any job runs if ROOT or a job's folder cannot be written."""
    root = resolve_output(root)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"sweep output {root} exists and is not a folder")
    if (root / MANIFEST).is_file():
        raise ConfigError(f"sweep output {root} is the output folder of a single export; give the sweep its own")
    for job in jobs:
        if job.name in REPORT_FILES or job.name == STATE_FILE:
            raise ConfigError(f"job name '{job.name}' is the name of the sweep's own report file; rename the job")
        check_output(root / job.name)
    return root


def exit_code_of(outcomes: Sequence[Outcome]) -> int:
    codes = {o.exit_code for o in outcomes}
    if 2 in codes:
        return 2
    if codes - {0, 1, 2}:
        return 3
    return 1 if 1 in codes else 0


class _Events:
    """What executors report: the state file follows each finished job, so an interrupted
    sweep's rerun skips what was already done."""

    def __init__(self, root: Path, state: dict, tally: Tally):
        self.root, self.state, self.tally = root, state, tally
        self.outcomes: dict[str, Outcome] = {}

    def started(self, job: Job, attempt: int) -> None:
        self.tally.started(job.name, attempt)

    def retrying(self, job: Job, why: str) -> None:
        self.tally.retrying(job.name, why)

    def finished(self, job: Job, outcome: Outcome) -> None:
        record(self.root, job, outcome, self.state)
        self.outcomes[job.name] = outcome
        self.tally.finished(outcome)


def run_sweep(jobs: Sequence[Job], root: Path, sweep_file: Path, job_fn: JobFn, progress: Progress,
              workers: int = 1, ray_target=None) -> dict:
    """Run what is not done yet; return sweep.json's content (with `exit_code`). `ray_target`: a
    toolchain.ray_cluster.RayTarget, or None for this machine (`workers` processes; 1: in this
    process)."""
    root = check_root(root, jobs)
    root.mkdir(parents=True, exist_ok=True)
    state = load_state(root)
    with progress.task("sweep", len(jobs), "jobs") as bar:
        tally = Tally(len(jobs), progress, bar)
        events = _Events(root, state, tally)
        todo = []
        for job in jobs:
            if reusable(root, job, state):
                events.outcomes[job.name] = Outcome(job.name, state[job.name]["exit_code"],
                                                    state[job.name].get("message", ""), skipped=True, attempts=0)
                tally.finished(events.outcomes[job.name])
            else:
                todo.append(job)
        if ray_target is not None:
            from sqexport.toolchain.ray_cluster import ray_cluster
            from sqexport.toolchain.sweep_ray import run_ray

            with ray_cluster(ray_target) as info:
                runner = f"Ray {info['address']} ({info['nodes']} node(s), {info['cpus']:g} CPUs)"
                if todo:
                    run_ray(todo, root, job_fn, events)
        elif workers > 1:
            runner = f"{workers} worker processes"
            run_processes(todo, root, job_fn, events, workers)
        else:
            runner = "sequential, in process"
            run_sequential(todo, root, job_fn, events)
    outcomes = [events.outcomes[j.name] for j in jobs]
    code = exit_code_of(outcomes)
    rows = [job_row(j, events.outcomes[j.name], root) for j in jobs]
    return write_sweep_report(root, Path(sweep_file), rows, runner, code)
