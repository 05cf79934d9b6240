"""Recipe = ordered stage configs + target + gates; YAML load/dump; order validated at load."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from runtime_check.gates import Gates
from contracts.errors import ConfigError
from toolchain.registry import config_from_dict, config_to_dict

__all__ = ["Stage", "Recipe", "TARGETS", "load_recipe"]

TARGETS = ("cpu", "mobile")
# sparsity before quantization (methods.md, "Order"); recovery fine-tunes the pruned model
STAGE_ORDER = {"prune": 0, "recover": 1, "quantize": 2}


@dataclass(frozen=True)
class Stage:
    kind: str
    name: str
    config: Any

    @property
    def qualified(self) -> str:
        return f"{self.kind}.{self.name}"

    def to_dict(self) -> dict:
        return config_to_dict(self.kind, self.name, self.config)


@dataclass(frozen=True)
class Recipe:
    stages: tuple[Stage, ...] = ()
    target: str = "cpu"
    gates: Gates = field(default_factory=Gates)
    threads: int | None = None
    seed: int = 0

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if self.target not in TARGETS:
            raise ConfigError(f"unknown target '{self.target}'; known: {', '.join(TARGETS)}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}")
        ranks = [STAGE_ORDER[s.kind] for s in self.stages]
        if ranks != sorted(ranks):
            raise ConfigError("stage order: pruning, then recovery, then quantization "
                              "(quantization scales are computed on the pruned weights)")
        if any(s.kind == "recover" for s in self.stages) and not any(s.kind == "prune" for s in self.stages):
            raise ConfigError("recovery fine-tunes a pruned model: the recipe needs a pruning stage before it")
        if sum(1 for s in self.stages if s.kind == "recover") > 1:
            raise ConfigError("a recipe takes at most one recovery stage")
        if sum(1 for s in self.stages if s.kind == "quantize") > 1:
            raise ConfigError("a recipe takes at most one quantization stage")

    def stage(self, kind: str) -> Stage | None:
        return next((s for s in self.stages if s.kind == kind), None)

    def with_stage(self, kind: str, stage: Stage | None) -> "Recipe":
        """Replace every stage of `kind` by `stage` (None removes them), keeping the order rule."""
        kept = [s for s in self.stages if s.kind != kind] + ([stage] if stage else [])
        return replace(self, stages=tuple(sorted(kept, key=lambda s: STAGE_ORDER[s.kind])))

    def to_dict(self) -> dict:
        return {"target": self.target, "seed": self.seed, "threads": self.threads,
                "stages": [s.to_dict() for s in self.stages], "gates": asdict(self.gates)}

    @classmethod
    def from_dict(cls, data: dict) -> "Recipe":
        if not isinstance(data, dict):
            raise ConfigError("a recipe must be a YAML mapping")
        known = {"target", "seed", "threads", "stages", "gates"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"recipe: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        stages = []
        for item in data.get("stages") or []:
            kind, name, config = config_from_dict(item if isinstance(item, dict) else {"type": item})
            stages.append(Stage(kind, name, config))
        try:
            gates = Gates(**(data.get("gates") or {}))
        except TypeError as exc:
            raise ConfigError(f"recipe gates: {exc}") from None
        return cls(stages=tuple(stages), target=data.get("target", "cpu"), gates=gates,
                   threads=data.get("threads"), seed=int(data.get("seed", 0)))

    def dump(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def load_recipe(path: Path) -> Recipe:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read recipe {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    return Recipe.from_dict(data or {})
