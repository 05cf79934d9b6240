"""Work the pipeline does not repeat and copies it does not keep: a model the caller hands over
is compressed without a second copy where nothing needs the original, with the very same output;
the FP32 graph is dropped once model.onnx is written."""
import json

import numpy as np
import pytest
import torch

from sqexport.models.hf import build_hf_spec
from sqexport.runtime_check.gates import Gates
from sqexport.runtime_check.verify import FIDELITY_SAMPLES
from sqexport.toolchain import pipeline
from sqexport.toolchain.quantization.int8 import Int8StaticConfig
from sqexport.toolchain.quantization.smoothing import SmoothQuantConfig
from sqexport.toolchain.pruning.magnitude import MagnitudePruneConfig
from sqexport.toolchain.recipe import Recipe, Stage

SMOOTH_INT8 = (Stage("transform", "smoothquant", SmoothQuantConfig()), Stage("quantize", "int8", Int8StaticConfig()))


def _run(tiny_bert, out, disposable: bool):
    spec = build_hf_spec(tiny_bert)  # a fresh model per run: a disposable one gets smoothed in place
    original = {k: v.clone() for k, v in spec.model.state_dict().items()}
    report = pipeline.run(Recipe(stages=SMOOTH_INT8, gates=Gates(max_accuracy_drop=0.05), threads=1), spec, out,
                          model_disposable=disposable)
    changed = any(not torch.equal(v, spec.model.state_dict().get(k, v)) for k, v in original.items()) \
        or set(spec.model.state_dict()) != set(original)
    return report, changed


@pytest.mark.e2e
def test_disposable_model_gives_the_same_output_without_a_copy(tiny_bert, tmp_path):
    kept, kept_changed = _run(tiny_bert, tmp_path / "copy", False)
    used, used_changed = _run(tiny_bert, tmp_path / "own", True)
    assert not kept_changed  # the default never touches the caller's model
    assert used_changed  # disposable: smoothing worked on the model itself (no second copy)
    assert (tmp_path / "copy" / "model.onnx").read_bytes() == (tmp_path / "own" / "model.onnx").read_bytes()
    for key in ("accuracy", "fidelity", "quantization", "sparsity"):
        assert used[key] == kept[key], key
    assert json.loads((tmp_path / "own" / "report.json").read_text())["passed"] == kept["passed"]
    stages = {s["name"]: s for s in used["stages"]}
    # nothing pruned: sparse storage has nothing to store, still reports it, and measured the file once
    assert stages["export.sparse_storage"]["params"]["sparse_initializers"] == 0
    assert used["sparse_storage"]["sparse"] == used["sparse_storage"]["dense"] and not used["sparse_storage"]["used"]
    assert "verify.sizes" in stages  # the deflate of both files is a timed stage with a bar
    assert used["size_bytes"]["compressed"] == used["sparse_storage"]["dense"]["compressed"]
    # later stages still ran on what was freed or reused: fidelity against the torch reference holds
    assert used["fidelity"]["max_abs_deviation"] < 0.05 * used["fidelity"]["reference_max_abs"]
    # on the leading evaluation batches (FIDELITY_SAMPLES), and report.md says how many
    fid, evaluated = used["fidelity"], sum(len(b["input_ids"]) for b in build_hf_spec(tiny_bert).eval_batches)
    assert fid["eval_samples"] == evaluated and min(FIDELITY_SAMPLES, evaluated) <= fid["samples"] <= evaluated
    assert f"on {fid['samples']} of {evaluated} evaluation samples" in (tmp_path / "own" / "report.md").read_text()


def _state(spec, stages, disposable):
    return pipeline.RunState(Recipe(stages=stages), spec, None, 1, pipeline.StageTimer(None), None,
                             model_disposable=disposable)


def test_the_original_is_copied_whenever_a_step_reads_it(tiny_bert_spec):
    prune = Stage("prune", "magnitude", MagnitudePruneConfig(sparsity=0.5))
    assert pipeline._work_copy(_state(tiny_bert_spec, SMOOTH_INT8, False)) is not tiny_bert_spec.model
    assert pipeline._work_copy(_state(tiny_bert_spec, (prune,) + SMOOTH_INT8, True)) is not tiny_bert_spec.model
    own = pipeline._work_copy(_state(tiny_bert_spec, SMOOTH_INT8, True))
    assert own is tiny_bert_spec.model and not any(p.requires_grad for p in own.parameters())


@pytest.mark.e2e
def test_the_fp32_graph_is_dropped_after_quantization(tiny_bert, tmp_path):
    spec = build_hf_spec(tiny_bert)
    seen = {}
    steps = list(pipeline.STEPS)
    i = steps.index(pipeline.quantize)

    def quantize_then_look(state):
        pipeline.quantize(state)
        seen["prepared"] = state.prepared
        seen["model_onnx"] = (state.tmp / "model.onnx").exists()
    steps[i] = quantize_then_look
    original = pipeline.STEPS
    pipeline.STEPS = tuple(steps)
    try:
        pipeline.run(Recipe(stages=SMOOTH_INT8, threads=1), spec, tmp_path / "out", model_disposable=True)
    finally:
        pipeline.STEPS = original
    assert seen == {"prepared": None, "model_onnx": True}
    assert np.isfinite(json.loads((tmp_path / "out" / "report.json").read_text())["fidelity"]["max_abs_deviation"])
