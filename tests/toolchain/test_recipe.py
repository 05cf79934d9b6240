"""Recipe: ordered stages + target + gates; YAML round trip and order validation."""
import pytest

from sqexport.runtime_check.gates import Gates
from sqexport.contracts.errors import ConfigError
from sqexport.toolchain.pruning.magnitude import MagnitudePruneConfig
from sqexport.toolchain.pruning.nm import NMPruneConfig
from sqexport.toolchain.quantization.fallback import FallbackPolicy
from sqexport.toolchain.quantization.int8 import Int8DynamicConfig, Int8StaticConfig
from sqexport.toolchain.quantization.smoothing import SmoothQuantConfig
from sqexport.toolchain.recipe import Recipe, Stage, load_recipe

PRUNE = Stage("prune", "magnitude", MagnitudePruneConfig(0.7, "layer"))
QUANT = Stage("quantize", "int8", Int8StaticConfig(observer="minmax", percentile=99.9))


SMOOTH = Stage("transform", "smoothquant", SmoothQuantConfig(0.6))


def test_yaml_dump_load_round_trip(tmp_path):
    recipe = Recipe(stages=(PRUNE, SMOOTH, QUANT), target="cpu", gates=Gates(0.5, 1.2, 3.0), threads=2, seed=7)
    path = tmp_path / "r.yaml"
    path.write_text(recipe.dump())
    loaded = load_recipe(path)
    assert loaded == recipe
    assert loaded.stage("prune").config == MagnitudePruneConfig(0.7, "layer")
    assert loaded.gates == Gates(0.5, 1.2, 3.0)
    # and again: dump(load(dump(r))) is stable
    assert loaded.dump() == recipe.dump()


def test_default_recipe_round_trip(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(Recipe().dump())
    assert load_recipe(path) == Recipe()


def test_hand_written_yaml(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("stages:\n  - prune.nm\n  - type: quantize.int8\n    params: {observer: mse}\n"
                    "gates:\n  max_accuracy_drop: 0.5\nseed: 3\n")
    r = load_recipe(path)
    assert [s.qualified for s in r.stages] == ["prune.nm", "quantize.int8"]
    assert r.stage("prune").config == NMPruneConfig(2, 4)
    assert r.stage("quantize").config.observer == "mse"
    assert r.gates.max_accuracy_drop == 0.5 and r.seed == 3 and r.target == "cpu"


def test_quantize_before_prune_is_rejected():
    with pytest.raises(ConfigError, match="prun"):
        Recipe(stages=(QUANT, PRUNE))


def test_quantize_before_prune_is_rejected_when_loading(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("stages:\n  - type: quantize.int8\n  - type: prune.magnitude\n")
    with pytest.raises(ConfigError, match="stage order: pruning, then recovery, then transforms, then quantization"):
        load_recipe(path)


def test_at_most_one_quantization_stage():
    with pytest.raises(ConfigError, match="a recipe takes at most one quantization stage"):
        Recipe(stages=(PRUNE, QUANT, QUANT))


def test_with_stage_keeps_the_order_rule():
    r = Recipe(stages=(QUANT,)).with_stage("prune", PRUNE)
    assert r.stages == (PRUNE, QUANT)
    assert r.with_stage("prune", None).stages == (QUANT,)


@pytest.mark.parametrize("text, words", [
    ("target: gpu\n", "unknown target 'gpu'; known: cpu, mobile"),
    ("stagez: []\n", r"recipe: unknown key\(s\) stagez"),
    ("threads: 0\n", "threads must be an integer in .*, got 0"),
    ("gates: {max_drop: 1}\n", r"recipe gates: unknown key\(s\) max_drop"),
    ("- just\n- a list\n", r"must be a YAML mapping \(stages, gates, ...\), got list"),
    ("stages:\n  - type: prune.magnitude\n    params: {sparsity: 2.0}\n", r"sparsity must be in \[0, 1\), got 2.0"),
    ("stages: [prune.unknown]\n", "unknown prune method 'unknown'"),
    ("key: [unclosed\n", "is not valid YAML"),
])
def test_bad_recipes_are_config_errors(tmp_path, text, words):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=words):
        load_recipe(path)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_recipe(tmp_path / "nope.yaml")


@pytest.mark.parametrize("text", ["", "# nothing yet\n", "{}\n"])
def test_an_empty_recipe_is_an_error_not_a_run_that_does_nothing(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="empty"):
        load_recipe(path)


# ---------------------------------------------------------------- transforms and recipes of version 1

def test_transforms_sit_between_pruning_and_quantization():
    with pytest.raises(ConfigError, match="transforms"):
        Recipe(stages=(SMOOTH, PRUNE, QUANT))
    with pytest.raises(ConfigError, match="transforms"):
        Recipe(stages=(PRUNE, QUANT, SMOOTH))
    assert Recipe(stages=(QUANT,)).with_stage("transform", SMOOTH).stages == (SMOOTH, QUANT)


def test_smoothquant_without_quantization_is_rejected():
    with pytest.raises(ConfigError, match="add a quantize stage"):
        Recipe(stages=(PRUNE, SMOOTH))


def test_an_observer_is_not_a_stage(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("stages: [observer.minmax, quantize.int8]\n")
    with pytest.raises(ConfigError, match="not a recipe stage"):
        load_recipe(path)


@pytest.mark.parametrize("alpha", [0.0, -0.1, 1.5, "abc", True])
def test_smoothquant_alpha_outside_0_1_is_an_error(alpha):
    with pytest.raises(ConfigError, match="alpha"):
        SmoothQuantConfig(alpha)


def _load(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return load_recipe(path)


def test_old_smoothquant_parameter_becomes_a_stage(tmp_path):
    r = _load(tmp_path, "stages:\n  - type: prune.magnitude\n  - type: quantize.int8\n"
                        "    version: 1\n    params: {observer: minmax, smoothquant: 0.7, fallback: true}\n")
    assert [s.qualified for s in r.stages] == ["prune.magnitude", "transform.smoothquant", "quantize.int8"]
    assert r.stage("transform").config == SmoothQuantConfig(0.7)
    assert r.stage("quantize").config == Int8StaticConfig(observer="minmax")


def test_old_smoothquant_zero_means_no_stage(tmp_path):
    r = _load(tmp_path, "stages:\n  - type: quantize.int8-dynamic\n    params: {smoothquant: 0.0}\n")
    assert [s.qualified for s in r.stages] == ["quantize.int8-dynamic"]
    assert r.stage("quantize").config == Int8DynamicConfig()


def test_old_parameter_and_new_stage_together_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="moved to its own stage"):
        _load(tmp_path, "stages:\n  - type: transform.smoothquant\n  - type: quantize.int8\n"
                        "    params: {smoothquant: 0.5}\n")


def test_old_fallback_fields_become_a_policy(tmp_path):
    r = _load(tmp_path, "stages:\n  - type: quantize.int8\n"
                        "    params: {fallback: false, max_fallback_fraction: 0.1}\n")
    assert r.stage("quantize").config.fallback == FallbackPolicy(enabled=False, max_fraction=0.1)
    assert _load(tmp_path, "stages: [quantize.int8]\n").stage("quantize").config.fallback == FallbackPolicy()


@pytest.mark.parametrize("value", ["yes", 3, {"enabled": True, "share": 0.1}, {"max_fraction": 2.0},
                                   {"enabled": "no"}])
def test_bad_fallback_policies_are_config_errors(tmp_path, value):
    with pytest.raises(ConfigError, match="fallback"):
        Int8StaticConfig(fallback=value)
