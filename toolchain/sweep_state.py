"""What a sweep remembers between runs, and what one job's run came to.

`ROOT/.sqexport-sweep.json` maps each finished job to the hash of its normalized spec and the
hash of its output's manifest. A rerun skips a job only when both still match and the folder holds
exactly its manifest's files, unchanged: a changed option, input file or sqexport version, or a
touched output, runs the job again.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from sqexport.contracts.files import sha256_file
from sqexport.toolchain.output_folder import MANIFEST, intact_output
from sqexport.toolchain.sweep_spec import Job

__all__ = ["Outcome", "STATE_FILE", "load_state", "save_state", "reusable", "record", "retryable", "write_atomic"]

STATE_FILE = ".sqexport-sweep.json"


def retryable(exit_code: int | None) -> bool:
    """A job process that died (signal: negative code) or vanished without an answer (None) is
    retried; its own verdicts (0 passed, 1 gate, 2 bad input, 3 internal error, 128+N interrupted)
    are not: running it again would give the same answer."""
    return exit_code is None or exit_code < 0


@dataclass
class Outcome:
    """One job's result. `exit_code` is what `sqexport export` would have exited with (None:
    cancelled before it finished); `where`: the host or Ray node that ran it."""

    name: str
    exit_code: int | None
    message: str
    seconds: float = 0.0
    attempts: int = 1
    skipped: bool = False
    where: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def load_state(root: Path) -> dict:
    try:
        data = json.loads((root / STATE_FILE).read_text(encoding="utf-8"))
        return data["jobs"] if isinstance(data.get("jobs"), dict) else {}
    except (OSError, ValueError, AttributeError, KeyError):
        return {}  # no state, or unreadable: every job runs


def write_atomic(path: Path, text: str) -> None:
    """Written to a temporary file and renamed, so a kill never leaves half a file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; these are ordinary files
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def save_state(root: Path, jobs: dict) -> None:
    root.mkdir(parents=True, exist_ok=True)
    write_atomic(root / STATE_FILE, json.dumps({"tool": "sqexport", "version": 1, "jobs": jobs}, indent=1,
                                               sort_keys=True) + "\n")


def reusable(root: Path, job: Job, state: dict) -> bool:
    entry = state.get(job.name)
    outdir = root / job.name
    return (isinstance(entry, dict) and entry.get("spec_hash") == job.spec_hash
            and entry.get("exit_code") in (0, 1) and intact_output(outdir)
            and entry.get("manifest_sha256") == sha256_file(outdir / MANIFEST))


def record(root: Path, job: Job, outcome: Outcome, state: dict) -> None:
    """Remember a job whose output folder was written (exit 0 or 1); forget any other."""
    if outcome.exit_code in (0, 1) and (root / job.name / MANIFEST).is_file():
        state[job.name] = {"spec_hash": job.spec_hash, "exit_code": outcome.exit_code,
                           "manifest_sha256": sha256_file(root / job.name / MANIFEST),
                           "message": outcome.message}
    else:
        state.pop(job.name, None)
    save_state(root, state)
