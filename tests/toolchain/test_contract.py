"""Every registered method, run through the protocol of its kind (toolchain/stages.py) on a tiny model."""
from __future__ import annotations

import ast
import dataclasses
import inspect

import numpy as np
import pytest
import torch
from torch import nn

import sqexport.toolchain.builtin_methods as builtin
from sqexport.contracts.quant import Anchor, QuantParams
from sqexport.contracts.weight_grid import WeightGrid
from sqexport.toolchain.builtin_methods import entries
from sqexport.toolchain.quantization import fake_quant_model
from sqexport.toolchain.quantization.fallback import FallbackPolicy
from sqexport.toolchain.quantization.observers import RangeObserver, compute_range
from sqexport.toolchain.stages import (
    STAGE_KINDS, PruneContext, PruneResult, QuantContext, RecoverContext, StageConfig, TransformContext,
    TransformResult,
)

KINDS = STAGE_KINDS + ("observer",)


class Tiny(nn.Module):
    """A conv stem, then Q/K-like Linears that read the same token sequence (what SmoothQuant groups)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv1d(4, 8, 3, padding=1)
        self.q = nn.Linear(8, 8)
        self.k = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):  # x: (batch, 4, tokens)
        h = torch.relu(self.conv(x)).transpose(1, 2)  # (batch, tokens, 8)
        h = torch.relu(self.q(h)) + self.k(h)
        return self.head(h.mean(1))


def _batches():
    rng = np.random.default_rng(0)
    xs = [rng.normal(size=(4, 4, 6)).astype(np.float32) for _ in range(3)]
    xs[0][:, 2] *= 20.0  # an outlier channel, as transformers have
    return [{"x": x} for x in xs]


def _run(model, batch):
    with torch.no_grad():
        return [model(torch.from_numpy(batch["x"])).numpy()]


def _outputs(model):
    return np.concatenate([_run(model, b)[0] for b in _batches()])


def _layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Linear))}


ANCHORS = [Anchor("conv", quantize_output=True, quantize_bias=True), Anchor("q", quantize_output=True, dynamic_ok=True),
           Anchor("k", dynamic_ok=True), Anchor("head", quantize_bias=True, dynamic_ok=True)]


@pytest.mark.parametrize("entry", entries(), ids=lambda e: f"{e.kind}.{e.name}")
def test_config_declares_its_capabilities(entry):
    cls = entry.config_cls
    assert entry.kind in KINDS
    assert cls.kind == entry.kind
    assert isinstance(cls.requires_calibration, bool) and isinstance(cls.VERSION, int)
    assert isinstance(cls(), StageConfig)
    if entry.kind == "quantize":
        assert isinstance(cls.supports_fallback, bool)
        if cls.supports_fallback:
            assert isinstance(cls().fallback, FallbackPolicy)
    if entry.kind == "transform":
        assert isinstance(cls.requires_quantization, bool)
    if entry.kind == "prune":  # recovery after it unless asked otherwise: None, or its steps
        assert cls.default_recovery_steps is None or cls.default_recovery_steps >= 1
    assert list(inspect.signature(entry.handler).parameters)[:3] == (
        ["obs", "config"] if entry.kind == "observer" else ["model", "config", "ctx"])[:3]


def _run_prune(entry):
    model = Tiny().eval()
    layers = _layers(model)
    dense = sum(m.weight.numel() for m in layers.values())
    ctx = PruneContext(layers, _batches(), _run, example_inputs=_batches()[0], export=lambda m, p: None)
    # low-rank: decide by parameter count (timing 8 x 8 layers says nothing) at a rank that pays on
    # them (unrounded: a multiple of 8 is the full rank of an 8-wide layer)
    fields = {f.name for f in dataclasses.fields(entry.config_cls)}
    config = entry.config_cls(**{k: v for k, v in {"decide": "params", "rank_energy": 0.5, "rank_multiple": 1}.items()
                                 if k in fields})
    result = entry.handler(model, config, ctx)
    assert isinstance(result, PruneResult) and result.speed_note
    assert set(result.masks) <= set(layers)
    for name, mask in result.masks.items():
        assert mask.shape == layers[name].weight.shape
        assert torch.all(layers[name].weight[~mask] == 0)  # masked weights are exact zeros
    # zeroed (masks) or physically removed (structured): fewer nonzero weights either way
    assert sum(int((m.weight != 0).sum()) for m in layers.values()) < dense
    assert _outputs(model).shape == (12, 3)  # still a working model


def _run_recover(entry):
    from sqexport.models.spec import ModelSpec

    model = Tiny().eval()
    batches = _batches()
    spec = ModelSpec(name="tiny", model=model, task="image-classification", input_names=["x"], output_names=["y"],
                     example_inputs=batches[0], calib_batches=batches, eval_batches=batches,
                     calib_labels=np.array([0, 1, 2, 0] * 3), eval_labels=np.array([0, 1, 2, 0] * 3))
    student = Tiny().eval()
    with torch.no_grad():
        student.head.weight.mul_(0.5)
    fields = {f.name for f in dataclasses.fields(entry.config_cls)}
    config = entry.config_cls(**{k: v for k, v in {"steps": 2, "batch_size": 4}.items() if k in fields})
    info = entry.handler(student, config, RecoverContext(spec, seed=0))
    assert isinstance(info, dict)
    assert not any(p.requires_grad for p in student.parameters())  # handed back frozen, in eval mode
    assert not student.training


def _run_transform(entry):
    model = Tiny().eval()
    before = _outputs(model)
    result = entry.handler(model, entry.config_cls(), TransformContext(_batches(), _run))
    assert isinstance(result, TransformResult) and isinstance(result.info, dict)
    np.testing.assert_allclose(_outputs(result.model), before, rtol=1e-4, atol=1e-4)  # function preserved


def _run_quantize(entry):
    model = Tiny().eval()
    ctx = QuantContext(ANCHORS, _batches(), _run, weight_grid=WeightGrid(127))
    params = entry.handler(model, entry.config_cls(), ctx)
    assert isinstance(params, QuantParams) and params.anchors
    assert {a.module for a in params.anchors} <= {a.module for a in ANCHORS}
    for a in params.anchors:
        wq = params.weights[a.module]
        assert wq.q.dtype == np.int8 and np.abs(wq.q.astype(np.int16)).max() <= 127
        assert params.dynamic or a.module in params.inputs
    reference = _outputs(model)
    quantized = _outputs(fake_quant_model(model, params))
    assert np.abs(quantized - reference).max() < 0.1 * np.abs(reference).max()


def _run_observer(entry):
    obs = RangeObserver(entry.config_cls.keeps_samples)
    for b in _batches():
        obs.update(b["x"])
    lo, hi = entry.handler(obs, entry.config_cls())
    assert np.isfinite(lo) and np.isfinite(hi) and lo < hi
    assert obs.min <= compute_range(obs, entry.name)[0] <= 0.0 <= compute_range(obs, entry.name)[1] <= obs.max


RUNNERS = {"prune": _run_prune, "recover": _run_recover, "transform": _run_transform, "quantize": _run_quantize, "observer": _run_observer}


@pytest.mark.parametrize("entry", entries(), ids=lambda e: f"{e.kind}.{e.name}")
def test_every_method_runs_through_its_protocol(entry):
    RUNNERS[entry.kind](entry)


def test_every_method_module_is_listed_in_builtin_methods():
    """The one list: a registered method whose module builtin_methods does not import would only
    be found when something else happened to import it first."""
    tree = ast.parse(inspect.getsource(builtin))
    listed = {f"{n.module}.{a.name}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert {e.handler.__module__ for e in entries()} <= listed


def test_cli_choices_come_from_the_registries():
    from sqexport.contracts.targets import target_names
    from sqexport.contracts.tasks import hf_task_names
    from sqexport.toolchain.builtin_methods import names
    from sqexport.toolchain.cli import export_cmd

    choices = {p.name: list(p.type.choices) for p in export_cmd.params if hasattr(p.type, "choices")}
    assert choices["prune"] == names("prune") + ["none"]
    assert choices["quant"] == names("quantize") + ["none"]
    assert choices["observer"] == ["auto"] + names("observer")
    assert choices["task"] == hf_task_names()
    assert choices["target"] == target_names()
