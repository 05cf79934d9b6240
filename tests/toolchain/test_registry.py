"""name -> (config class, handler); config dict round trips."""
import dataclasses
import json

import pytest
import yaml

from sqexport.contracts.errors import ConfigError
from sqexport.toolchain.pruning.magnitude import MagnitudePruneConfig
from sqexport.toolchain.pruning.nm import NMPruneConfig
from sqexport.toolchain.quantization.int8 import Int8StaticConfig
from sqexport.toolchain.builtin_methods import config_from_dict, config_to_dict, entries, lookup, names


def test_builtin_methods_are_registered():
    assert {"magnitude", "nm"} <= set(names("prune"))
    assert "int8" in names("quantize")
    assert lookup("prune", "magnitude").config_cls is MagnitudePruneConfig
    assert lookup("prune", "nm").config_cls is NMPruneConfig
    assert lookup("quantize", "int8").config_cls is Int8StaticConfig
    for e in entries():
        assert e.summary and callable(e.handler) and e.config_cls is not None


@pytest.mark.parametrize("entry", entries(), ids=lambda e: f"{e.kind}.{e.name}")
def test_every_registered_default_config_round_trips(entry):
    cfg = entry.config_cls()
    data = config_to_dict(entry.kind, entry.name, cfg)
    assert data["type"] == f"{entry.kind}.{entry.name}"
    assert data["version"] == getattr(cfg, "VERSION", 1)
    assert data["params"] == dataclasses.asdict(cfg)
    # survives JSON and YAML (what the report and recipe files hold)
    for text in (json.dumps(data), yaml.safe_dump(data)):
        assert config_from_dict(yaml.safe_load(text)) == (entry.kind, entry.name, cfg)


@pytest.mark.parametrize("kind, name, cfg", [
    ("prune", "magnitude", MagnitudePruneConfig(sparsity=0.7, scope="layer")),
    ("prune", "nm", NMPruneConfig(n=1, m=8)),
    ("quantize", "int8", Int8StaticConfig(observer="minmax", percentile=99.9)),
])
def test_non_default_configs_round_trip(kind, name, cfg):
    assert config_from_dict(config_to_dict(kind, name, cfg)) == (kind, name, cfg)


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(ConfigError, match="unknown prune method 'structured-nonexistent'") as exc:
        lookup("prune", "structured-nonexistent")
    assert "magnitude" in str(exc.value) and "nm" in str(exc.value)
    with pytest.raises(ConfigError, match="unknown quantize method 'int4'; known: int8, int8-dynamic"):
        config_from_dict({"type": "quantize.int4"})


@pytest.mark.parametrize("data, words", [
    ({"type": "magnitude"}, "stage needs a type like 'prune.magnitude'"),  # no kind
    ({"params": {}}, "stage needs a type like 'prune.magnitude'"),  # no type
    ({"type": "prune.magnitude", "params": {"sparsity": 0.5, "bogus": 1}},
     "prune.magnitude: unknown parameter.s. bogus; known: scope, sparsity"),  # unknown param
    ({"type": "prune.magnitude", "params": {"sparsity": 1.5}}, r"sparsity must be in \[0, 1\), got 1.5"),  # invalid value
    ({"type": "prune.nm", "params": {"n": 4, "m": 2}}, "N:M pruning needs 0 < N < M, got 4:2"),
])
def test_bad_stage_dicts_are_config_errors(data, words):
    with pytest.raises(ConfigError, match=words):
        config_from_dict(data)


def test_missing_params_take_defaults():
    assert config_from_dict({"type": "prune.nm"}) == ("prune", "nm", NMPruneConfig())
