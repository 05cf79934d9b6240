"""The default activation ranges (observer `auto`): min-max, or the percentile clip where it clearly
keeps the outputs closer to FP32; one calibration pass serves both."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from sqexport.contracts.errors import ConfigError
from sqexport.contracts.quant import Anchor
from sqexport.runtime_check.isa import weight_grid
from sqexport.toolchain.quantization import calibrate, fake_quant_model
from sqexport.toolchain.quantization.int8 import Int8StaticConfig, quantize_static
from sqexport.toolchain.quantization.range_choice import WIN_RATIO, choose_range, output_error
from sqexport.toolchain.quantization.static import calibrate_each
from sqexport.toolchain.stages import QuantContext


def test_output_error_is_the_mean_of_one_minus_cosine():
    fp = np.array([[1.0, 0.0], [0.0, 2.0]])
    q = np.array([[1.0, 1.0], [0.0, 5.0]])  # 45 degrees off, then the same direction
    assert output_error(fp, q) == pytest.approx((1 - 1 / math.sqrt(2) + 0.0) / 2)
    # any output shape: each sample's values are one vector
    assert output_error(fp.reshape(2, 1, 2), q.reshape(2, 2, 1)) == pytest.approx(output_error(fp, q))


def test_min_max_stays_unless_the_percentile_clearly_wins():
    assert choose_range({"minmax": 1.0, "percentile": 0.81}, 99.99)[0] == "minmax"
    chosen, record = choose_range({"minmax": 1.0, "percentile": WIN_RATIO}, 99.99)
    assert chosen == "percentile"
    assert record["chosen"] == "percentile" and record["output_error"] == {"minmax": 1.0, "percentile": 0.8}
    assert "0.80x" in record["why"] and record["percentile"] == 99.99
    assert choose_range({"minmax": 0.0, "percentile": 0.0}, 99.99)[0] == "minmax"  # exact: nothing to win


class _Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.relu, self.fc2 = nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)

    def forward(self, x):
        return self.fc2(self.relu(self.fc1(x)))


ANCHORS = [Anchor("fc1", quantize_output=True, quantize_bias=True), Anchor("fc2", quantize_bias=True)]


def _run(model, batch):
    return model(torch.from_numpy(batch["x"]))


def _batches(outlier: float | None) -> list[dict]:
    """1024 samples uniform in [-2, 2]; with `outlier`, one value of one sample is that large (a
    rare sample that stretches min-max's range of fc1's input and, through it, of fc2's)."""
    x = np.random.default_rng(0).uniform(-2.0, 2.0, (1024, 64)).astype(np.float32)
    if outlier is not None:
        x[5, 3] = outlier
    return [{"x": x[i:i + 128]} for i in range(0, 1024, 128)]


def _scorer(model, batches):
    """What quantize_step binds: the fake-quant model's output error against FP32."""
    with torch.no_grad():
        fp = np.concatenate([_run(model, b).numpy() for b in batches])

    def error(params):
        fq = fake_quant_model(model, params)
        with torch.no_grad():
            return output_error(fp, np.concatenate([_run(fq, b).numpy() for b in batches]))
    return error


def _quantize(model, batches, observer, scorer=None):
    ctx = QuantContext(ANCHORS, batches, _run, weight_grid=weight_grid("cpu"), output_error=scorer)
    return quantize_static(model, Int8StaticConfig(observer=observer), ctx), ctx


@pytest.mark.parametrize("outlier, expected", [(400.0, "percentile"), (None, "minmax")])
def test_auto_takes_the_ranges_of_the_method_it_chose(outlier, expected):
    model, batches = _Mlp().eval(), _batches(outlier)
    params, ctx = _quantize(model, batches, "auto", _scorer(model, batches))
    record = ctx.decisions["range_choice"]
    assert record["chosen"] == expected
    errors = record["output_error"]
    # the rule, on the errors it measured
    assert (errors["percentile"] <= WIN_RATIO * errors["minmax"]) == (expected == "percentile")
    explicit, _ = _quantize(model, batches, expected)
    assert params.inputs == explicit.inputs
    for name in params.weights:
        np.testing.assert_array_equal(params.biases[name][0], explicit.biases[name][0])
    if outlier is not None:  # the clip: fc1's input range no longer reaches the outlier
        assert params.inputs["fc1"].scale * 255 < outlier / 10


def test_auto_without_a_scorer_is_min_max_and_records_nothing():
    model, batches = _Mlp().eval(), _batches(400.0)
    params, ctx = _quantize(model, batches, "auto")
    assert ctx.decisions == {}
    assert params.inputs == _quantize(model, batches, "minmax")[0].inputs


def test_one_pass_gives_each_methods_ranges():
    model, batches = _Mlp().eval(), _batches(400.0)
    calls = []
    both = calibrate_each(model, ANCHORS, batches, lambda m, b: calls.append(1) or _run(m, b), ["minmax", "percentile"])
    assert len(calls) == len(batches)
    for method, ranges in zip(["minmax", "percentile"], both):
        assert ranges == calibrate(model, ANCHORS, batches, _run, method)


def test_auto_is_a_known_observer_and_typos_are_not():
    assert Int8StaticConfig().observer == "auto"
    with pytest.raises(ConfigError, match="known: auto, "):
        Int8StaticConfig(observer="percentil")


@pytest.mark.e2e
def test_the_default_export_reports_its_range_choice(default_export):
    record = default_export.report["quantization"]["range_choice"]
    errors = record["output_error"]
    assert set(errors) == {"minmax", "percentile"} and record["samples"] > 0
    wins = errors["percentile"] <= WIN_RATIO * errors["minmax"]
    assert record["chosen"] == ("percentile" if wins else "minmax")
    assert default_export.report["recipe"]["stages"][-1]["params"]["observer"] == "auto"
