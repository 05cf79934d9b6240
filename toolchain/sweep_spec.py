"""`sqexport sweep SWEEP.yaml`: the file, read into jobs that are each one `sqexport export` command line.

    defaults:            # optional: options every job starts from
      seed: 0
    jobs:
      - name: cnn-nm     # the job's folder under ROOT: a plain folder name, unique
        model: digits-cnn
        prune: nm        # any export option by its long flag name, '-' written '_'
        quant: int8-dynamic

A job becomes the argument list a user would type (`digits-cnn --prune nm --quant int8-dynamic`),
and the CLI parses and checks it with the export command's own parser (`validate` is handed in by
the CLI): a sweep accepts exactly what `sqexport export` accepts, with the same messages, and a job
writes the same bytes a single run would. Paths in the file are relative to the file's folder.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from sqexport.contracts.errors import ConfigError, first_line
from sqexport.contracts.files import sha256_file

__all__ = ["Flag", "Job", "load_sweep", "PATH_OPTIONS", "NOT_IN_JOBS"]

# options naming files or folders: resolved against the sweep file's folder, hashed into the spec
PATH_OPTIONS = ("recipe", "calib_data", "eval_data", "recover_data")
# the sweep owns these: the folder is ROOT/<name>, progress is the sweep's own
NOT_IN_JOBS = {"output": "the job's folder is ROOT/<name>", "quiet": "use sqexport sweep --quiet",
               "ray": "give --ray to sqexport sweep"}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class Flag:
    """How one export option is typed: `opt` (--prune), `off` (--no-recover) for on/off pairs,
    `switch` for a bare flag (--auto), `multiple` for a repeatable one (--input-shape)."""

    opt: str
    off: str | None = None
    switch: bool = False
    multiple: bool = False


@dataclass(frozen=True)
class Job:
    """One export. `argv`: MODEL and options as typed; `paths`: argv positions holding input paths
    (the model's own file or folder at 0 when it is one), so a Ray task can swap in its copies;
    `spec_hash`: the normalized options, the input files' contents and the sqexport version."""

    name: str
    model: str
    argv: tuple[str, ...]
    paths: tuple[int, ...]
    options: Mapping[str, Any]
    spec_hash: str

    @property
    def command(self) -> str:
        return "sqexport " + " ".join(_quote(a) for a in self.argv)


def _quote(arg: str) -> str:
    return arg if re.fullmatch(r"[A-Za-z0-9._:/=,+-]+", arg) else "'" + arg.replace("'", "'\\''") + "'"


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `nm: 2:4` as the base-60 integer 124; here it stays the text the user typed."""


_Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if not (tag.endswith(":int") and rx.match("2:4"))]
    + ([("tag:yaml.org,2002:int", re.compile(r"^[-+]?(?:0|[1-9][0-9_]*)$"))] if ch in "0123456789+-" else [])
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _read(path: Path) -> dict:
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
    except OSError as exc:
        raise ConfigError(f"cannot read sweep file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"sweep file {path} is not UTF-8 text") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"sweep file {path} is not valid YAML: {first_line(exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"sweep file {path} must be a mapping with a 'jobs' list")
    unknown = sorted(str(k) for k in set(data) - {"jobs", "defaults"})
    if unknown:
        raise ConfigError(f"sweep file {path}: unknown key(s) {', '.join(unknown)}; known: defaults, jobs")
    if not isinstance(data.get("jobs"), list) or not data["jobs"]:
        raise ConfigError(f"sweep file {path}: 'jobs' must be a non-empty list of mappings")
    if not isinstance(data.get("defaults", {}), dict):
        raise ConfigError(f"sweep file {path}: 'defaults' must be a mapping of export options")
    return data


def _label(index: int, name: Any) -> str:
    return f"jobs[{index}]" + (f" ({name})" if isinstance(name, str) else "")


def _args(key: str, value: Any, flag: Flag, label: str) -> list[str]:
    """The command-line words for one option; types are left to the export parser, except that a
    mapping, a list where one value is wanted, or a missing value cannot be typed at all."""
    if flag.switch or flag.off:
        if not isinstance(value, bool):
            raise ConfigError(f"{label}: {key} must be true or false, got {value!r}")
        return [flag.opt] if value else ([flag.off] if flag.off else [])
    values = value if flag.multiple and isinstance(value, list) else [value]
    for v in values:
        if v is None or isinstance(v, (bool, dict, list)):
            raise ConfigError(f"{label}: {key} needs {'values' if flag.multiple else 'a value'} as typed after "
                              f"{flag.opt}, got {v!r}")
    return [w for v in values for w in (flag.opt, v if isinstance(v, str) else repr(v))]


def _content_hash(path: Path) -> str:
    """A file's SHA-256, or for a folder the hash of its files' relative paths and hashes."""
    if path.is_file():
        return sha256_file(path)
    if path.is_dir():
        h = hashlib.sha256()
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(f"{f.relative_to(path)}\0{sha256_file(f)}\0".encode())
        return h.hexdigest()
    return "missing"


def _job(index: int, raw: Any, defaults: dict, flags: Mapping[str, Flag], base: Path, is_path_model,
         validate: Callable[[list[str], str], dict], version: str) -> Job:
    if not isinstance(raw, dict):
        raise ConfigError(f"{_label(index, None)} must be a mapping with name, model and options")
    label = _label(index, raw.get("name"))
    merged = {**defaults, **raw}
    for key in ("name", "model"):
        if not isinstance(merged.get(key), str) or not merged[key].strip():
            raise ConfigError(f"{label}: '{key}' is required (a string)")
    name, model = merged.pop("name"), merged.pop("model")
    if not _NAME.fullmatch(name) or name in (".", ".."):
        raise ConfigError(f"{label}: name must be a plain folder name (letters, digits, '.', '_', '-'; "
                          f"no '/'), got {name!r}")
    for key in merged:
        if key in NOT_IN_JOBS:
            raise ConfigError(f"{label}: '{key}' cannot be set per job: {NOT_IN_JOBS[key]}")
        if key not in flags:
            raise ConfigError(f"{label}: unknown option '{key}'; known: name, model, "
                              + ", ".join(sorted(flags)))
    argv, paths = [model], []
    if is_path_model(model) and (base / model).exists():
        argv[0] = str((base / model).resolve())
        paths.append(0)
    for key in sorted(merged):
        value = merged[key]
        if key in PATH_OPTIONS and isinstance(value, str):
            value = str((base / value).resolve())
        words = _args(key, value, flags[key], f"{label}: {key}")
        if key in PATH_OPTIONS and words:
            paths.append(len(argv) + 1)
        argv.extend(words)
    normalized = validate(argv, label)
    inputs = {argv[i]: _content_hash(Path(argv[i])) for i in paths}
    spec = json.dumps({"argv0": model, "options": normalized, "inputs": inputs, "sqexport": version},
                      sort_keys=True, default=str)
    return Job(name, model, tuple(argv), tuple(paths), normalized, hashlib.sha256(spec.encode()).hexdigest())


def load_sweep(path: Path, flags: Mapping[str, Flag], validate: Callable[[list[str], str], dict],
               is_path_model: Callable[[str], bool], version: str) -> list[Job]:
    """Every job of the file, checked. `flags`: the export options by name; `validate(argv, label)`
    parses a job's command line as `sqexport export` would (ConfigError naming `label` if it is
    bad) and returns the normalized options; `is_path_model(ref)`: False for built-in names."""
    path = Path(path)
    data = _read(path)
    jobs = [_job(i, raw, data.get("defaults") or {}, flags, path.parent, is_path_model, validate, version)
            for i, raw in enumerate(data["jobs"])]
    seen: set[str] = set()
    for job in jobs:
        if job.name.lower() in seen:  # case-insensitive file systems would merge the folders
            raise ConfigError(f"sweep file {path}: job name '{job.name}' is used twice")
        seen.add(job.name.lower())
    return jobs
