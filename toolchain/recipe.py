"""Recipe = ordered stage configs + target + gates; YAML load/dump; order validated at load."""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from sqexport.runtime_check.gates import Gates
from sqexport.contracts.errors import ConfigError
from sqexport.contracts.targets import target_names
from sqexport.toolchain.builtin_methods import config_from_dict, config_to_dict
from sqexport.toolchain.order import DEFAULT_ORDER, ORDERS
from sqexport.toolchain.recipe_yaml import read_recipe_yaml
from sqexport.toolchain.settings import check_setting
from sqexport.toolchain.stages import STAGE_KINDS

__all__ = ["Stage", "Recipe", "TARGETS", "load_recipe", "upgrade_stage_dicts"]

TARGETS = tuple(target_names())  # the target registry (contracts/targets.py) owns them
# prune, recover, transform, quantize: int8 scales are computed on the final (pruned, recovered,
# smoothed) weights
STAGE_ORDER = {kind: rank for rank, kind in enumerate(STAGE_KINDS)}


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
    # "q_then_s": quantize weights before pruning (a study option, toolchain/order.py)
    order: str = DEFAULT_ORDER
    # the prune stage's sparsity is chosen by the run within the accuracy budget
    # (toolchain/sparsity_search.py); the stage's own value is replaced by the choice
    auto_sparsity: bool = False

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if self.target not in target_names():
            raise ConfigError(f"unknown target '{self.target}'; known: {', '.join(target_names())}")
        check_setting("seed", self.seed)
        if self.order not in ORDERS:
            raise ConfigError(f"order must be one of {', '.join(ORDERS)}, got {self.order!r}")
        if self.order != DEFAULT_ORDER and not (self.stage("prune") and self.stage("quantize")):
            raise ConfigError(f"order {self.order} compares pruning and quantization: the recipe needs both stages")
        if self.threads is not None:
            check_setting("threads", self.threads)
        for name, value in asdict(self.gates).items():
            if value is not None:
                check_setting(name, value, f"gate {name}")
        for s in self.stages:
            if s.kind not in STAGE_ORDER:
                raise ConfigError(f"'{s.qualified}' is not a recipe stage; stage kinds: {', '.join(STAGE_KINDS)}")
        if self.auto_sparsity:
            prune = self.stage("prune")
            if prune is None or not getattr(type(prune.config), "auto_sparsity", False):
                raise ConfigError("auto_sparsity needs a prune stage whose method chooses its amount "
                                  "(magnitude, structured)")
        ranks = [STAGE_ORDER[s.kind] for s in self.stages]
        if ranks != sorted(ranks):
            raise ConfigError("stage order: pruning, then recovery, then transforms, then quantization "
                              "(quantization scales are computed on the final weights)")
        if any(s.kind == "recover" for s in self.stages) and not any(s.kind == "prune" for s in self.stages):
            raise ConfigError("recovery fine-tunes a pruned model: the recipe needs a pruning stage before it")
        if sum(1 for s in self.stages if s.kind == "recover") > 1:
            raise ConfigError("a recipe takes at most one recovery stage")
        if sum(1 for s in self.stages if s.kind == "quantize") > 1:
            raise ConfigError("a recipe takes at most one quantization stage")
        if self.stage("quantize") is None:
            for s in self.stages:
                if s.kind == "transform" and s.config.requires_quantization:
                    raise ConfigError(f"{s.qualified} only prepares a model for quantization; "
                                      "add a quantize stage after it or remove it")

    def stage(self, kind: str) -> Stage | None:
        return next((s for s in self.stages if s.kind == kind), None)

    def stages_of(self, kind: str) -> list[Stage]:
        return [s for s in self.stages if s.kind == kind]

    def with_stage(self, kind: str, stage: Stage | None) -> "Recipe":
        """Replace every stage of `kind` by `stage` (None removes them), keeping the order rule."""
        return self.with_stages(kind, [stage] if stage else [])

    def with_stages(self, kind: str, stages: list[Stage]) -> "Recipe":
        kept = [s for s in self.stages if s.kind != kind] + list(stages)
        return replace(self, stages=tuple(sorted(kept, key=lambda s: STAGE_ORDER[s.kind])))

    def to_dict(self) -> dict:
        out = {"target": self.target, "seed": self.seed, "threads": self.threads,
               "stages": [s.to_dict() for s in self.stages], "gates": asdict(self.gates)}
        if self.order != DEFAULT_ORDER:  # recipes and reports without the study option stay as they were
            out["order"] = self.order
        if self.auto_sparsity:
            out["auto_sparsity"] = True
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "Recipe":
        if not isinstance(data, dict):
            raise ConfigError("a recipe must be a YAML mapping")
        known = {"target", "seed", "threads", "stages", "gates", "order", "auto_sparsity"}
        unknown = sorted(str(k) for k in set(data) - known)
        if unknown:
            raise ConfigError(f"recipe: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        items = data.get("stages") or []
        if not isinstance(items, list):
            raise ConfigError(f"recipe stages must be a list of stages, got {items!r}")
        stages = []
        for item in upgrade_stage_dicts(items):
            kind, name, config = config_from_dict(item)
            stages.append(Stage(kind, name, config))
        gates = data.get("gates") or {}
        if not isinstance(gates, dict):
            raise ConfigError(f"recipe gates must be a mapping, got {gates!r}")
        fields = [f.name for f in dataclasses.fields(Gates)]
        unknown = sorted(str(k) for k in set(gates) - set(fields))
        if unknown:
            raise ConfigError(f"recipe gates: unknown key(s) {', '.join(unknown)}; known: {', '.join(fields)}")
        gates = {k: check_setting(k, v, f"gate {k}") for k, v in gates.items() if v is not None}
        threads = data.get("threads")
        target = data.get("target", "cpu")
        if not isinstance(target, str):
            raise ConfigError(f"recipe target must be a string, got {target!r}")
        order = data.get("order", DEFAULT_ORDER)
        if not isinstance(order, str):
            raise ConfigError(f"recipe order must be one of {', '.join(ORDERS)}, got {order!r}")
        auto_sparsity = data.get("auto_sparsity", False)
        if not isinstance(auto_sparsity, bool):
            raise ConfigError(f"recipe auto_sparsity must be true or false, got {auto_sparsity!r}")
        return cls(stages=tuple(stages), target=target, gates=Gates(**gates), order=order,
                   auto_sparsity=auto_sparsity,
                   threads=None if threads is None else check_setting("threads", threads),
                   seed=check_setting("seed", data.get("seed", 0)))

    def dump(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


LEGACY_SMOOTHING = ("quantize.int8", "quantize.int8-dynamic")


def upgrade_stage_dicts(items: list) -> list[dict]:
    """Recipes written before SmoothQuant became a stage and fallback a policy still load:
    `smoothquant: ALPHA` inside quantize.int8 / int8-dynamic becomes a `transform.smoothquant`
    stage in front of it (0 = none), and `fallback: BOOL` + `max_fallback_fraction: F` become
    `fallback: {enabled, max_fraction}`. Giving both the old key and the new stage is an error."""
    items = [dict(i) if isinstance(i, dict) else {"type": i} for i in items]
    explicit = any(str(i.get("type")) == "transform.smoothquant" for i in items)
    out = []
    for item in items:
        params = item.get("params")
        if str(item.get("type")) in LEGACY_SMOOTHING and isinstance(params, dict):
            params = dict(params)
            if "smoothquant" in params:
                alpha = params.pop("smoothquant")
                if explicit:
                    raise ConfigError(f"{item['type']}: 'smoothquant' moved to its own stage; the recipe "
                                      "already has transform.smoothquant, so remove the old parameter")
                if alpha:
                    out.append({"type": "transform.smoothquant", "params": {"alpha": alpha}})
            if "max_fallback_fraction" in params:
                old = params.pop("max_fallback_fraction")
                policy = params.get("fallback", True)
                if not isinstance(policy, bool):
                    raise ConfigError(f"{item['type']}: give the fallback share as fallback.max_fraction, "
                                      "not max_fallback_fraction")
                params["fallback"] = {"enabled": policy, "max_fraction": old}
            item = {**item, "params": params}
        out.append(item)
    return out


def load_recipe(path: Path) -> Recipe:
    """An empty recipe is an error: it would run no stage at all and look like success. The file is
    read strictly (toolchain/recipe_yaml.py: regular file, size, aliases, depth, duplicate keys)."""
    data = read_recipe_yaml(Path(path))
    if data is None or data == {}:
        raise ConfigError(f"recipe {path} is empty; give it stages (see docs/user-guide.md, Recipes), or leave out --recipe "
                          "for the defaults")
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a YAML mapping (stages, gates, ...), got {type(data).__name__}")
    try:
        return Recipe.from_dict(data)
    except RecursionError:
        raise ConfigError(f"recipe {path} is nested too deeply") from None
