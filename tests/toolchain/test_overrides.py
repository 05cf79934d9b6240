"""Flags on top of recipes: typed flags win, the recipe keeps the rest, defaults fill the gaps."""
import pytest

from sqexport.runtime_check.gates import Gates
from sqexport.contracts.errors import ConfigError
from sqexport.toolchain.overrides import Overrides, apply_overrides
from sqexport.toolchain.pruning.magnitude import MagnitudePruneConfig
from sqexport.toolchain.quantization.int8 import Int8StaticConfig
from sqexport.toolchain.quantization.smoothing import SmoothQuantConfig
from sqexport.toolchain.recipe import Recipe, Stage


def _recipe(**kw):
    stages = (Stage("prune", "magnitude", MagnitudePruneConfig(0.3, "layer")),
              Stage("quantize", "int8", Int8StaticConfig(observer="percentile")))
    return Recipe(stages=stages, gates=Gates(max_accuracy_drop=0.5), **kw)


def test_defaults_without_recipe():
    r = apply_overrides(None, Overrides())
    assert [s.qualified for s in r.stages] == ["prune.magnitude", "transform.smoothquant", "quantize.int8"]
    assert r.stage("prune").config == MagnitudePruneConfig(0.5, "global")
    assert r.stage("transform").config == SmoothQuantConfig(alpha=0.85)
    assert r.stage("quantize").config == Int8StaticConfig()


def test_no_default_smoothing_without_quantization_or_with_a_recipe_file():
    assert [s.qualified for s in apply_overrides(None, Overrides(quant="none")).stages] == ["prune.magnitude"]
    assert [s.qualified for s in apply_overrides(_recipe(), Overrides()).stages] == ["prune.magnitude", "quantize.int8"]


def test_quant_none_drops_the_transforms_that_only_serve_quantization():
    recipe = Recipe(stages=(Stage("transform", "smoothquant", SmoothQuantConfig(0.5)),
                            Stage("quantize", "int8", Int8StaticConfig())))
    assert apply_overrides(recipe, Overrides(quant="none")).stages == ()


def test_model_default_prune_none_unless_sparsity_typed():
    assert [s.qualified for s in apply_overrides(None, Overrides(), "none").stages] == ["transform.smoothquant",
                                                                                       "quantize.int8"]
    r = apply_overrides(None, Overrides(sparsity=0.25), "none")
    assert r.stage("prune").config == MagnitudePruneConfig(0.25, "global")


def test_recipe_values_survive_untyped_flags():
    r = apply_overrides(_recipe(), Overrides())
    assert r.stage("prune").config == MagnitudePruneConfig(0.3, "layer")
    assert r.stage("quantize").config.observer == "percentile"
    assert r.gates.max_accuracy_drop == 0.5


def test_typed_flags_override_single_fields():
    r = apply_overrides(_recipe(), Overrides(sparsity=0.6, observer="minmax", min_speedup=1.5, threads=1))
    assert r.stage("prune").config == MagnitudePruneConfig(0.6, "layer")  # scope kept from the recipe
    assert r.stage("quantize").config.observer == "minmax"
    assert r.gates == Gates(max_accuracy_drop=0.5, min_speedup=1.5)
    assert r.threads == 1


def test_switching_method_and_removing_stages():
    r = apply_overrides(_recipe(), Overrides(prune="nm", nm="1:4", quant="none"))
    assert [s.qualified for s in r.stages] == ["prune.nm"]
    assert (r.stage("prune").config.n, r.stage("prune").config.m) == (1, 4)


def test_sparsity_without_a_prune_stage_in_the_recipe_is_an_error():
    recipe = Recipe(stages=(Stage("quantize", "int8", Int8StaticConfig()),))
    with pytest.raises(ConfigError, match="pruning stage"):
        apply_overrides(recipe, Overrides(sparsity=0.5))


@pytest.mark.parametrize("overrides, flag", [
    (Overrides(prune="nm", sparsity=0.3), "--sparsity"),
    (Overrides(prune="magnitude", nm="2:4"), "--nm"),
    (Overrides(prune="none", sparsity=0.3), "--sparsity"),
    (Overrides(quant="int8-dynamic", observer="percentile"), "--observer"),
    (Overrides(quant="none", observer="minmax"), "--observer"),
])
def test_flags_the_method_cannot_use_are_errors_not_no_ops(overrides, flag):
    with pytest.raises(ConfigError, match=flag):
        apply_overrides(None, overrides)


def test_model_quant_defaults_apply_without_recipe_and_flags_win():
    d = {"observer": "mse", "bias_correction": True}
    r = apply_overrides(None, Overrides(), "none", d)
    assert r.stage("quantize").config == Int8StaticConfig(observer="mse", bias_correction=True)
    r = apply_overrides(None, Overrides(observer="minmax"), "none", d)
    assert r.stage("quantize").config == Int8StaticConfig(observer="minmax", bias_correction=True)
    # a recipe file says everything itself; int8-dynamic ignores keys it does not have
    assert apply_overrides(_recipe(), Overrides(), "none", d).stage("quantize").config.observer == "percentile"
    assert apply_overrides(None, Overrides(quant="int8-dynamic"), "none", d).stage("quantize").name == "int8-dynamic"


def test_recipe_options_are_declared_once_and_every_surface_reads_them():
    """Overrides is the one list of options laid over a recipe: the CLI has a flag for each, the
    Python API an option, and the ones --auto chooses are refused beside --auto, by flag name."""
    from dataclasses import fields

    from sqexport.toolchain.cli import cli
    from sqexport.toolchain.export_options import ExportOptions
    from sqexport.toolchain.overrides import AUTO_CHOSEN_KEYS, OVERRIDE_KEYS
    from sqexport.toolchain.search import AUTO_CHOOSES, check_auto_flags

    export_params = {p.name for p in cli.commands["export"].params}
    assert set(OVERRIDE_KEYS) <= export_params
    assert set(OVERRIDE_KEYS) <= {f.name for f in fields(ExportOptions)}
    assert set(AUTO_CHOOSES) == {*AUTO_CHOSEN_KEYS, "recipe"}
    assert {"prune", "sparsity", "quant", "rank_energy"} <= set(AUTO_CHOSEN_KEYS) and "seed" not in AUTO_CHOSEN_KEYS
    for key in AUTO_CHOSEN_KEYS:
        with pytest.raises(ConfigError, match="--auto chooses .*" + "--" + key.replace("_", "-")):
            check_auto_flags([key])
