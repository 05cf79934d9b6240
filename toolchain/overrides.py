"""Command-line settings on top of a recipe: what the user typed wins, the rest comes from the
recipe file, or from the defaults when there is none."""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from sqexport.contracts.errors import ConfigError
from sqexport.toolchain.pruning.nm import parse_nm
from sqexport.toolchain.recipe import Recipe, Stage
from sqexport.toolchain.builtin_methods import lookup

__all__ = ["Overrides", "OVERRIDE_KEYS", "AUTO_CHOSEN_KEYS", "apply_overrides", "DEFAULT_SPARSITY"]

DEFAULT_SPARSITY = 0.5
# Without a recipe file, int8 runs behind these transforms. SmoothQuant (alpha 0.85) keeps
# all-MiniLM-L6-v2 at mean cosine 0.998; on models without Linears over token sequences it
# changes nothing. A recipe file runs exactly the stages it lists.
DEFAULT_TRANSFORMS = ("smoothquant",)


# --auto chooses these itself: giving one with --auto is an error (search.check_auto_flags)
_AUTO = {"auto_chooses": True}


@dataclass(frozen=True)
class Overrides:
    """Only what was typed; None = not given.

    The one declaration of the options that lay over a recipe file: ExportOptions' recipe keys,
    the settings checked on construction (settings.SETTINGS by name) and what --auto chooses itself
    (field metadata `auto_chooses`) are read from here. A new method flag = a field here (plus a
    Setting when it has a numeric range) and its click option."""

    prune: str | None = field(default=None, metadata=_AUTO)
    sparsity: float | None = field(default=None, metadata=_AUTO)
    nm: str | None = field(default=None, metadata=_AUTO)
    variant: str | None = field(default=None, metadata=_AUTO)
    rank_energy: float | None = field(default=None, metadata=_AUTO)
    lowrank_eps: float | None = field(default=None, metadata=_AUTO)
    quant: str | None = field(default=None, metadata=_AUTO)
    observer: str | None = None
    max_accuracy_drop: float | None = None
    min_speedup: float | None = None
    max_latency_ms: float | None = None
    threads: int | None = None
    seed: int | None = None
    target: str | None = None
    recover: bool | None = None
    recover_steps: int | None = field(default=None, metadata=_AUTO)
    recover_minutes: float | None = field(default=None, metadata=_AUTO)
    recover_data: str | None = None


OVERRIDE_KEYS = tuple(f.name for f in fields(Overrides))
AUTO_CHOSEN_KEYS = tuple(f.name for f in fields(Overrides) if f.metadata.get("auto_chooses"))


def _stage(kind: str, name: str, current: Stage | None, updates: dict) -> Stage | None:
    if name == "none":
        return None
    entry = lookup(kind, name)
    base = current.config if current is not None and current.name == name else entry.config_cls()
    params = {**base.__dict__, **{k: v for k, v in updates.items() if k in base.__dict__}}
    return Stage(kind, name, entry.config_cls(**params))


def _prune_stage(recipe: Recipe, o: Overrides, from_file: bool, default_prune: str) -> Stage | None:
    current = recipe.stage("prune")
    implied = ("magnitude" if o.sparsity is not None else "nm" if o.nm is not None
               else "lowrank" if o.rank_energy is not None or o.lowrank_eps is not None else None)
    name = o.prune or (current.name if from_file and current else implied)
    if name is None:
        if from_file:
            return None
        name = default_prune
    updates = {}
    if o.sparsity is not None or not (from_file and current and current.name == name):
        updates["sparsity"] = o.sparsity if o.sparsity is not None else DEFAULT_SPARSITY
    if o.variant is not None:
        updates["variant"] = o.variant
    if name == "nm" and (o.nm is not None or not (from_file and current and current.name == "nm")):
        updates["n"], updates["m"] = parse_nm(o.nm or "2:4")
    if o.rank_energy is not None:
        updates["rank_energy"] = o.rank_energy
    if o.lowrank_eps is not None:
        updates["eps"] = o.lowrank_eps
    return _stage("prune", name, current, updates)


def _reject_inapplicable(value, flag: str, stage: Stage | None, field: str) -> None:
    """A typed flag the chosen method has no use for is an error, never a silent no-op."""
    if value is not None and (stage is None or field not in stage.config.__dict__):
        method = stage.qualified if stage else "no such stage"
        raise ConfigError(f"{flag} does not apply to {method}")


def _recover_stage(recipe: Recipe, o: Overrides, from_file: bool) -> Stage | None:
    current = recipe.stage("recover")
    prune = recipe.stage("prune")
    # a method that changes every weight (low-rank) declares recovery by default; a recipe file
    # runs exactly the stages it lists
    steps = None if from_file or prune is None else type(prune.config).default_recovery_steps
    updates = {k: v for k, v in (("steps", o.recover_steps), ("minutes", o.recover_minutes),
                                 ("data", o.recover_data)) if v is not None}
    if o.recover is False:
        if updates:
            raise ConfigError("--recover-steps/--recover-minutes/--recover-data contradict --no-recover")
        return None
    if o.recover is None and current is None and steps is not None:
        return _stage("recover", "distill", None, {"steps": steps, **updates})
    if o.recover is None and current is None:
        if updates:
            raise ConfigError("--recover-steps/--recover-minutes/--recover-data need --recover")
        return None
    if recipe.stage("prune") is None:
        raise ConfigError("--recover fine-tunes a pruned model: choose a pruning method (--prune)")
    return _stage("recover", current.name if current else "distill", current, updates)


def apply_overrides(recipe: Recipe | None, o: Overrides, default_prune: str = "magnitude",
                    quant_defaults: dict | None = None) -> Recipe:
    """`default_prune` is the model's default method (used without --prune, --sparsity, --nm or a
    recipe stage); `quant_defaults` are the model's quantization params, used without a recipe
    file (a typed flag still wins; keys the chosen method lacks are ignored)."""
    from_file = recipe is not None
    recipe = recipe or Recipe()
    lowrank_flags = o.rank_energy is not None or o.lowrank_eps is not None
    if from_file and recipe.stage("prune") is None and o.prune is None and (o.sparsity is not None or o.nm
                                                                            or lowrank_flags):
        raise ConfigError("--sparsity/--nm/--rank-energy/--lowrank-eps need a pruning stage: the recipe has "
                          "none, so add --prune")
    before = recipe.stage("prune")
    recipe = recipe.with_stage("prune", _prune_stage(recipe, o, from_file, default_prune))
    prune = recipe.stage("prune")
    if o.sparsity is not None or prune is None or not getattr(type(prune.config), "auto_sparsity", False):
        recipe = replace(recipe, auto_sparsity=False)  # a typed --sparsity is honoured exactly
    elif not (from_file and before is not None and before.name == prune.name):
        recipe = replace(recipe, auto_sparsity=True)  # the amount was not given anywhere
    _reject_inapplicable(o.sparsity, "--sparsity", recipe.stage("prune"), "sparsity")
    _reject_inapplicable(o.nm, "--nm", recipe.stage("prune"), "n")
    _reject_inapplicable(o.variant, "--variant", recipe.stage("prune"), "variant")
    _reject_inapplicable(o.rank_energy, "--rank-energy", recipe.stage("prune"), "rank_energy")
    _reject_inapplicable(o.lowrank_eps, "--lowrank-eps", recipe.stage("prune"), "eps")
    recipe = recipe.with_stage("recover", _recover_stage(recipe, o, from_file))
    current_q = recipe.stage("quantize")
    q_name = o.quant or (current_q.name if current_q else (None if from_file else "int8"))
    if q_name == "none":  # transforms that only prepare for int8 leave with the quantize stage
        recipe = recipe.with_stages("transform", [s for s in recipe.stages if s.kind == "transform"
                                                  and not s.config.requires_quantization])
    if q_name is not None:
        updates = dict(quant_defaults or {}) if not from_file else {}
        if o.observer:
            updates["observer"] = o.observer
        recipe = recipe.with_stage("quantize", _stage("quantize", q_name, current_q, updates))
    if not from_file and recipe.stage("quantize") is not None:
        recipe = recipe.with_stages("transform", [Stage("transform", name, lookup("transform", name).config_cls())
                                                  for name in DEFAULT_TRANSFORMS])
    _reject_inapplicable(o.observer, "--observer", recipe.stage("quantize"), "observer")
    gate_flags = {k: getattr(o, k) for k in ("max_accuracy_drop", "min_speedup", "max_latency_ms")
                  if getattr(o, k) is not None}
    changes = {"gates": replace(recipe.gates, **gate_flags)} if gate_flags else {}
    for key in ("threads", "seed", "target"):
        if getattr(o, key) is not None:
            changes[key] = getattr(o, key)
    if from_file and not recipe.stages and o.quant != "none":
        raise ConfigError("the recipe has no stages, so this run would neither prune nor quantize; add "
                          "stages, or pass --prune/--quant (--quant none for a plain FP32 export)")
    return Recipe(**{**recipe.__dict__, **changes}) if changes else recipe


