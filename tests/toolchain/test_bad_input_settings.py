"""Settings: a value of the wrong type or out of range, from a flag or a recipe, is exit 2 with one
line naming it (never exit 3, never silently accepted); flags and recipes share the same limits."""
import os

import pytest

from sqexport.contracts.errors import ConfigError
from sqexport.toolchain.overrides import Overrides, apply_overrides
from sqexport.toolchain.recipe import Recipe


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _check(result, workdir, inputs):
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, result.output
    assert sorted(os.listdir(workdir)) == sorted(inputs), "output left behind"
    return errors[0]


RECIPES = {
    "seed-abc": ("seed: abc\n", "seed"),
    "seed-negative": ("seed: -1\n", "seed"),
    "seed-too-big": (f"seed: {2 ** 32}\n", "seed"),
    "seed-bool": ("seed: true\n", "seed"),
    "threads-float": ("threads: 1.5\n", "threads"),
    "threads-huge": ("threads: 100000\n", "threads"),
    "threads-zero": ("threads: 0\n", "threads"),
    "stages-int": ("stages: 5\n", "stages"),
    "stages-mapping": ("stages: {type: prune.magnitude}\n", "stages"),
    "stage-list": ("stages:\n  - [1, 2]\n", "stage"),
    "stage-type-int": ("stages:\n  - type: 5\n", "type"),
    "params-list": ("stages:\n  - type: prune.magnitude\n    params: [1, 2]\n", "params"),
    "params-string": ("stages:\n  - type: prune.magnitude\n    params: abc\n", "params"),
    "sparsity-string": ("stages:\n  - type: prune.magnitude\n    params: {sparsity: half}\n", "sparsity"),
    "sparsity-nan": ("stages:\n  - type: prune.magnitude\n    params: {sparsity: .nan}\n", "sparsity"),
    "n-float": ("stages:\n  - type: prune.nm\n    params: {n: 1.5}\n", "n"),
    "m-huge": ("stages:\n  - type: prune.nm\n    params: {n: 1, m: 1000000000}\n", "M"),
    "bool-as-int": ("stages:\n  - type: quantize.int8\n    params: {fallback: 1}\n", "fallback"),
    "observer-int": ("stages:\n  - type: quantize.int8\n    params: {observer: 3}\n", "observer"),
    "stage-unknown-key": ("stages:\n  - type: prune.magnitude\n    sparsity: 0.3\n", "sparsity"),
    "gate-abc": ("stages: [quantize.int8]\ngates: {max_accuracy_drop: abc}\n", "max_accuracy_drop"),
    "gate-negative": ("stages: [quantize.int8]\ngates: {max_accuracy_drop: -5}\n", "max_accuracy_drop"),
    "gate-nan": ("stages: [quantize.int8]\ngates: {min_speedup: .nan}\n", "min_speedup"),
    "gate-inf": ("stages: [quantize.int8]\ngates: {max_latency_ms: .inf}\n", "max_latency_ms"),
    "gates-list": ("stages: [quantize.int8]\ngates: [1]\n", "gates"),
    "target-list": ("stages: [quantize.int8]\ntarget: [cpu]\n", "target"),
    "top-level-list": ("- quantize.int8\n", "mapping"),
    "empty-file": ("", "empty"),
    "only-comments": ("# nothing yet\n", "empty"),
    "no-stages": ("seed: 3\n", "no stages"),
    "recover-minutes-inf": ("stages:\n  - type: prune.magnitude\n  - type: recover.distill\n"
                            "    params: {minutes: .inf}\n", "minutes"),
}


@pytest.mark.parametrize("text, needle", RECIPES.values(), ids=RECIPES.keys())
def test_bad_recipe(run_cli, workdir, text, needle):
    (workdir / "r.yaml").write_text(text)
    line = _check(run_cli(["export", "digits-mlp", "--recipe", "r.yaml", "-o", "out"]), workdir, ["r.yaml"])
    assert needle in line


def test_a_recipe_that_is_not_utf8(run_cli, workdir):
    (workdir / "r.yaml").write_bytes(b"seed: 1\n# caf\xe9\n\xff\xfe")
    line = _check(run_cli(["export", "digits-mlp", "--recipe", "r.yaml", "-o", "out"]), workdir, ["r.yaml"])
    assert "UTF-8" in line


FLAGS = {
    "seed-negative": (["--seed", "-1"], "--seed"), "seed-too-big": (["--seed", str(2 ** 32)], "--seed"),
    "seed-abc": (["--seed", "abc"], "--seed"), "threads-huge": (["--threads", "100000"], "--threads"),
    "threads-float": (["--threads", "1.5"], "--threads"), "sparsity-nan": (["--sparsity", "nan"], "--sparsity"),
    "gate-nan": (["--max-accuracy-drop", "nan"], "--max-accuracy-drop"),
    "gate-inf": (["--min-speedup", "inf"], "--min-speedup"),
    "gate-negative": (["--max-latency-ms", "-3"], "--max-latency-ms"),
    "nm-huge": (["--prune", "nm", "--nm", "1:1000000000"], "1000000000"),
    "recover-minutes-nan": (["--prune", "magnitude", "--recover", "--recover-minutes", "nan"],
                            "--recover-minutes"),
}


@pytest.mark.parametrize("flags, needle", FLAGS.values(), ids=FLAGS.keys())
def test_bad_flag(run_cli, workdir, flags, needle):
    line = _check(run_cli(["export", "digits-mlp", *flags, "-o", "out"]), workdir, [])
    assert needle in line


@pytest.mark.parametrize("gates, error", [
    ({"max_accuracy_drop": 0}, None),
    ({"max_accuracy_drop": -5}, r"gate max_accuracy_drop must be a number in \[0, inf\), got -5.0"),
    ({"min_speedup": 0}, r"gate min_speedup must be a number in \(0, inf\), got 0.0"),
    ({"max_latency_ms": 1e-3}, None),
])
def test_flags_and_recipes_apply_the_same_limits(gates, error):
    def from_recipe():
        return Recipe.from_dict({"stages": ["quantize.int8"], "gates": gates})

    def from_flags():
        return apply_overrides(None, Overrides(**gates))

    for build in (from_recipe, from_flags):
        if error is None:
            assert getattr(build().gates, *gates) == list(gates.values())[0]
        else:
            with pytest.raises(ConfigError, match=error):
                build()
