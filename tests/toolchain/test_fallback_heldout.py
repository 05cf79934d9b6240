"""Fallback whose prediction holds on data it never scored.

A tiny classifier where plain int8 (static and dynamic) breaks the 1-point gate on held-out data:
one input feature is a huge nuisance value the classifier ignores, so a per-tensor uint8 scale on
the first layer's input rounds the informative features away. The fallback must bring the
held-out drop under the limit in both modes, and say what its prediction used.
"""
import json

import numpy as np
import pytest
import torch
from torch import nn

from sqexport.models.spec import ModelSpec
from sqexport.runtime_check.gates import Gates
from sqexport.toolchain.builtin_methods import lookup
from sqexport.toolchain.pipeline import run
from sqexport.toolchain.quantization.fallback import FallbackPolicy
from sqexport.toolchain.recipe import Recipe, Stage

FEATURES, CLASSES = 16, 6


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(FEATURES, 48), nn.Linear(48, CLASSES)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


CENTERS = np.random.default_rng(7).normal(scale=2.0, size=(CLASSES, FEATURES)).astype(np.float32)


def _data(n: int, seed: int) -> np.ndarray:
    """Clusters around one center per class, plus the nuisance feature 0: huge and meaningless."""
    rng = np.random.default_rng(seed)
    x = CENTERS[rng.integers(0, CLASSES, n)] + rng.normal(scale=0.7, size=(n, FEATURES)).astype(np.float32)
    x[:, 0] = rng.choice([-1000.0, 1000.0], size=n)
    return x.astype(np.float32)


_TRAINED = []


def _classifier() -> nn.Module:
    """Trained briefly on the clusters with feature 0 blanked, then told to ignore it (weight 0)."""
    if not _TRAINED:
        torch.manual_seed(0)
        model = Net()
        rng = np.random.default_rng(0)
        y = rng.integers(0, CLASSES, 2000)
        x = CENTERS[y] + rng.normal(scale=0.7, size=(2000, FEATURES)).astype(np.float32)
        x[:, 0] = 0.0
        opt = torch.optim.Adam(model.parameters(), lr=0.02)
        xt, yt = torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y)
        for _ in range(150):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt), yt).backward()
            opt.step()
        with torch.no_grad():
            model.fc1.weight[:, 0] = 0.0
        _TRAINED.append(model.eval())
    return _TRAINED[0]


def _spec(model) -> ModelSpec:
    calib, evals = _data(256, 1), _data(600, 2)  # held out: a different draw, more samples

    def labels(x):
        with torch.no_grad():
            return model(torch.from_numpy(x)).argmax(-1).numpy()  # FP32 is right by construction
    batches = lambda x: [{"x": x[i:i + 32]} for i in range(0, len(x), 32)]  # noqa: E731
    return ModelSpec(name="nuisance-mlp", model=model, task="image-classification", input_names=["x"],
                     output_names=["logits"], example_inputs={"x": evals[:1]}, calib_batches=batches(calib),
                     eval_batches=batches(evals), eval_labels=labels(evals), calib_labels=labels(calib),
                     dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}}, default_prune="none")


def _run(tmp_path, quant: str, fallback) -> dict:
    entry = lookup("quantize", quant)
    recipe = Recipe(stages=(Stage("quantize", quant, entry.config_cls(fallback=fallback)),),
                    gates=Gates(max_accuracy_drop=1.0), threads=1)
    out = tmp_path / f"{quant}-{bool(fallback)}"
    report = run(recipe, _spec(_classifier()), out)
    assert json.loads((out / "report.json").read_text())["accuracy"] == report["accuracy"]
    return report


@pytest.mark.e2e
@pytest.mark.parametrize("quant", ["int8", "int8-dynamic"])
def test_fallback_brings_the_held_out_drop_under_the_limit(tmp_path, quant):
    plain = _run(tmp_path, quant, False)
    assert plain["accuracy"]["drop"] > 1.0  # plain int8 breaks the gate on held-out data
    assert plain["passed"] is False

    fixed = _run(tmp_path, quant, FallbackPolicy())
    q = fixed["quantization"]
    assert fixed["accuracy"]["drop"] <= 1.0 and fixed["passed"] is True
    assert [f["layer"] for f in q["fallback"]] == ["fc1"]  # the nuisance-fed layer, worst SNR first
    assert q["predicted_drop_trace"][0] > 1.0 >= q["predicted_drop_trace"][-1]
    pred = q["prediction"]
    assert "no evaluation labels" in pred["uses"]
    # smooth quantities: not a multiple of 1/n of the calibration samples
    assert pred["before_fallback"]["smooth_flip_points"] > 1.0
    assert pred["before_fallback"]["eval_samples"] == 600 and pred["before_fallback"]["samples"] == 256
    # two layers: the default cap (25%) allows none, so it adapts to one and the report says so
    assert q["fallback_cap"] == {"layers": 2, "max_layers": 0, "hard_max_layers": 1, "used": 1, "raised": True,
                                 "holds": True}
    assert any("cap raised" in note for note in fixed["notes"])
    # the prediction held on the evaluation split: confirmed with one measurement, still held out
    assert q["fallback_confirmation"]["held_out"] is True and q["fallback_confirmation"]["added_layers"] == 0
    assert [m["fallback_layers"] for m in q["fallback_confirmation"]["measured"]] == [1]


@pytest.mark.e2e
def test_a_prediction_the_evaluation_split_refutes_is_extended_there(tmp_path, monkeypatch):
    """A prediction that misses (here: one that always says 0) is caught by measuring the exported
    graph on the evaluation split: the fallback continues down its ranking until the gate holds
    there, and the report says the gate is no longer held out. With `confirm: false` the miss
    reaches the gate."""
    import sqexport.toolchain.fallback_step as fallback_step

    monkeypatch.setattr(fallback_step, "predict_drop", lambda *args, **kwargs: {"predicted": 0.0})
    confirmed = _run(tmp_path, "int8", FallbackPolicy())
    q = confirmed["quantization"]
    assert confirmed["passed"] is True and confirmed["accuracy"]["drop"] <= 1.0
    assert q["predicted_drop_trace"] == [0.0]  # the prediction returned nothing
    assert [(f["layer"], f["chosen_by"]) for f in q["fallback"]] == [("fc1", "evaluation split")]
    c = q["fallback_confirmation"]
    assert c["samples"] == 600 and c["added_layers"] == 1 and c["held_out"] is False and c["holds"] is True
    assert c["measured"][0]["fallback_layers"] == 0 and c["measured"][0]["drop"] > 1.0
    assert c["measured"][-1] == {"fallback_layers": 1, "drop": c["drop"]}
    assert c["drop"] == pytest.approx(confirmed["accuracy"]["drop"], abs=1e-9)  # what the gate then measured
    assert q["fallback_cap"]["holds"] is True
    assert any("confirmed on the evaluation split" in n and "held out" in n
               for n in confirmed["notes"])
    fp32 = {f["layer"]: f["reason"] for f in q["coverage"]["fp32"]}
    assert "evaluation split measured the gate failing" in fp32["fc1"]
    assert not list(tmp_path.rglob("fallback-confirm.onnx"))  # the measured graphs lived in the run's temp dir

    unconfirmed = _run(tmp_path / "unconfirmed", "int8", FallbackPolicy(confirm=False))
    assert unconfirmed["passed"] is False and "fallback_confirmation" not in unconfirmed["quantization"]


@pytest.mark.e2e
def test_the_confirmation_measures_the_graph_with_the_speed_checks_fp32_layers(tmp_path, monkeypatch):
    """The speed check runs between the prediction and the confirmation: the graph measured is the
    one written, with the layers it kept in FP32 (here fc2, as if its int8 kernel were slower),
    and the confirmation ranks only the layers still int8."""
    import sqexport.toolchain.fallback_step as fallback_step
    import sqexport.toolchain.quantize_step as quantize_step
    from sqexport.toolchain.quantization.fallback import without

    monkeypatch.setattr(fallback_step, "predict_drop", lambda *args, **kwargs: {"predicted": 0.0})
    monkeypatch.setattr(quantize_step, "_speed_check", lambda prepared, plan, params, *a: (
        without(params, {"fc2"}), {"kept_fp32": ["fc2"], "gain": 1.2, "why": "stand-in"}))
    report = _run(tmp_path, "int8", FallbackPolicy(max_fraction=1.0))
    q = report["quantization"]
    assert report["passed"] is True
    assert [(f["layer"], f["chosen_by"]) for f in q["fallback"]] == [("fc1", "evaluation split")]
    reasons = {f["layer"]: f["reason"] for f in q["coverage"]["fp32"]}
    assert reasons["fc2"].startswith("kept FP32 for speed") and "evaluation split" in reasons["fc1"]
    assert [m["fallback_layers"] for m in q["fallback_confirmation"]["measured"]] == [0, 1]
    assert q["coverage"]["int8"] == 0 and q["quantized_layers"] == 1  # fc2 left by speed, not by the fallback


def _run_loose(tmp_path, name: str, fallback) -> dict:
    """The gate allows anything: whatever falls back here, the fidelity floor chose."""
    recipe = Recipe(stages=(Stage("quantize", "int8", lookup("quantize", "int8").config_cls(fallback=fallback)),),
                    gates=Gates(max_accuracy_drop=100.0), threads=1)
    return run(recipe, _spec(_classifier()), tmp_path / name)


@pytest.mark.e2e
def test_the_fidelity_floor_returns_layers_only_within_its_budget(tmp_path):
    """Plain int8 keeps this classifier's gate at a loose limit but not its outputs (fc1 reads the
    nuisance feature): the floor returns fc1 when its budget allows fc1's share of the
    multiply-accumulates (16 x 48 of 16 x 48 + 48 x 6 = 73 %), and nothing at the default third:
    the worst-ranked layer, fc1, is over that budget by itself, so no count is even tried."""
    share = 16 * 48 / (16 * 48 + 48 * 6)
    allowed = _run_loose(tmp_path, "allowed", FallbackPolicy(fidelity_mac_share=0.8))
    q = allowed["quantization"]
    floor = q["fidelity_floor"]
    assert floor["cosine_before"] < 0.99 <= floor["cosine"] and floor["reached"] is True
    assert floor["added_layers"] == 1 and floor["fp32_mac_share"] == pytest.approx(share, abs=1e-4)
    assert [(f["layer"], f["chosen_by"]) for f in q["fallback"]] == [("fc1", "fidelity floor")]
    assert q["fallback_cap"]["raised"] is False  # the gate needed none: no cap was raised for it
    reasons = {f["layer"]: f["reason"] for f in q["coverage"]["fp32"]}
    assert "fidelity floor" in reasons["fc1"] and q["coverage"]["int8"] == 1
    assert any(n.startswith("fidelity floor:") for n in allowed["notes"])

    default = _run_loose(tmp_path, "default", FallbackPolicy())
    floor = default["quantization"]["fidelity_floor"]
    assert floor["reached"] is False and floor["added_layers"] == 0 and default["quantization"]["fallback"] == []
    assert floor["cosine"] == floor["cosine_before"] and "none added" in floor["why"]
    assert [m["fallback_layers"] for m in floor["measured"]] == [0]

    off = _run_loose(tmp_path, "off", FallbackPolicy(min_cosine=0.0))
    assert "fidelity_floor" not in off["quantization"] and off["quantization"]["fallback"] == []
