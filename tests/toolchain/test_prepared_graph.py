"""prepared.onnx derived from the baseline graph (toolchain/prepared_graph.py) where smoothing is
the only change: it computes what an export of the smoothed model computes, the pipeline says it
derived it and writes the same model.onnx, and where derivation cannot apply the model is
exported and the report says why."""
import json

import numpy as np
import onnx
import pytest
import torch

from sqexport.contracts.progress import NULL_PROGRESS
from sqexport.exporters.export import export_model
from sqexport.models.hf import build_hf_spec
from sqexport.runtime_check.gates import Gates
from sqexport.runtime_check.session import make_session
from sqexport.toolchain import pipeline
from sqexport.toolchain.prepared_graph import GraphMismatch, derive_prepared, keep_baseline, recipe_blocker
from sqexport.toolchain.quantization.int8 import Int8StaticConfig
from sqexport.toolchain.quantization.smoothing import SmoothQuantConfig, smooth_model
from sqexport.toolchain.quantize_step import plan_quantization
from sqexport.toolchain.recipe import Recipe, Stage

SMOOTH_INT8 = (Stage("transform", "smoothquant", SmoothQuantConfig()), Stage("quantize", "int8", Int8StaticConfig()))


def _outputs(model: onnx.ModelProto | str, batches: list[dict]) -> list[np.ndarray]:
    sess = make_session(model.SerializeToString() if isinstance(model, onnx.ModelProto) else model, threads=1)
    names = {i.name for i in sess.get_inputs()}
    return [out for b in batches for out in sess.run(None, {k: v for k, v in b.items() if k in names})]


def test_derived_graph_computes_what_an_export_of_the_smoothed_model_computes(tiny_bert, tmp_path):
    spec = build_hf_spec(tiny_bert)  # smoothed in place below, as a disposable model is in a run
    baseline = keep_baseline(export_model(spec, spec.model, tmp_path / "baseline.onnx"), spec.model)
    smooth_model(spec.model, spec.calib_batches, spec.torch_outputs, alpha=0.85)
    derived, groups = derive_prepared(baseline, spec.model)
    exported = export_model(spec, spec.model, tmp_path / "prepared.onnx")
    assert groups == 8  # per layer: Q/K/V share one scale, then attention output, intermediate, output
    onnx.checker.check_model(derived)
    mul_inputs = [n.input[1] for n in derived.graph.node if n.op_type == "Mul" and n.input[1].endswith(".inv_scale")]
    assert len(mul_inputs) == groups
    ours, theirs = _outputs(derived, spec.eval_batches), _outputs(exported, spec.eval_batches)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    with torch.no_grad():
        torch_out = [o for b in spec.eval_batches for o in spec.torch_outputs(spec.model, b)]
    for a, b in zip(ours, torch_out):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
    # the quantization plan finds every smoothed Linear where the export has it; the activation
    # Q/DQ of a smoothed Linear goes after the Mul (its input is the Mul's output)
    plan, exported_plan = plan_quantization(spec.model, derived, spec), plan_quantization(spec.model, exported, spec)
    assert set(plan.sites) == set(exported_plan.sites) and len(plan.sites) == 12
    assert [a.module for a in plan.anchors] == [a.module for a in exported_plan.anchors]
    assert plan.embedding_sites.keys() == exported_plan.embedding_sites.keys()
    producers = {o: n.op_type for n in derived.graph.node for o in n.output}
    assert all(producers[s.activation] == "Mul" for s in plan.sites.values())
    qkv = {plan.sites[f"encoder.layer.0.attention.self.{n}.linear"].activation for n in ("query", "key", "value")}
    assert len(qkv) == 1  # one Mul for the group: one activation Q/DQ for all three


def _run(tiny_bert, out, **gates):
    spec = build_hf_spec(tiny_bert)
    report = pipeline.run(Recipe(stages=SMOOTH_INT8, gates=Gates(**gates), threads=1), spec, out,
                          model_disposable=True)
    return report, spec, {s["name"]: s for s in report["stages"]}


@pytest.mark.e2e
def test_the_pipeline_derives_prepared_onnx_and_writes_the_same_model(tiny_bert, tmp_path, monkeypatch):
    derived, spec, stages = _run(tiny_bert, tmp_path / "derived", max_accuracy_drop=0.05)
    params = stages["export.model"]["params"]
    assert params["derived_from"] == "baseline.onnx" and params["smoothed_groups"] == 8
    assert params["meanwhile"] == "baseline.onnx deflated for verify.sizes"
    assert not (tmp_path / "derived" / "prepared.onnx").exists()
    fid = derived["fidelity"]
    assert fid["max_abs_deviation"] <= 1e-3 * fid["reference_max_abs"]
    assert json.loads((tmp_path / "derived" / "report.json").read_text())["passed"]

    monkeypatch.setattr(pipeline, "recipe_blocker", lambda recipe: "exported for the comparison")
    exported, _, stages = _run(tiny_bert, tmp_path / "exported", max_accuracy_drop=0.05)
    assert stages["export.model"]["params"]["derive_skipped"] == "exported for the comparison"
    for key in ("quantized_layers", "int8_embeddings", "fallback", "predicted_drop_trace", "layers_snr_db"):
        assert derived["quantization"][key] == exported["quantization"][key], key
    ours = _outputs(str(tmp_path / "derived" / "model.onnx"), spec.eval_batches)
    theirs = _outputs(str(tmp_path / "exported" / "model.onnx"), spec.eval_batches)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    assert derived["accuracy"]["model"] == pytest.approx(exported["accuracy"]["model"], abs=1e-6)


@pytest.mark.e2e
def test_without_quantization_the_derived_graph_is_written_as_model_onnx(tiny_bert, tmp_path):
    spec = build_hf_spec(tiny_bert)
    report = pipeline.run(Recipe(stages=(), gates=Gates(max_accuracy_drop=0.05), threads=1), spec, tmp_path / "out")
    params = next(s for s in report["stages"] if s["name"] == "export.model")["params"]
    assert params["derived_from"] == "baseline.onnx" and params["smoothed_groups"] == 0
    assert not (tmp_path / "out" / "prepared.onnx").exists()  # written for the rename, renamed
    ours = _outputs(str(tmp_path / "out" / "model.onnx"), spec.eval_batches)
    for a, b in zip(ours, _outputs(str(tmp_path / "out" / "baseline.onnx"), spec.eval_batches)):
        np.testing.assert_array_equal(a, b)  # nothing changed the model: the baseline's own function


@pytest.mark.e2e
def test_a_model_derivation_cannot_handle_is_exported_and_the_report_says_why(tiny_bert, tmp_path, monkeypatch):
    real = build_hf_spec

    def with_twin_weights(folder):  # key's weight a copy of query's: content cannot tell them apart
        spec = real(folder)
        attn = spec.model.encoder.layer[0].attention.self
        attn.key.weight.data.copy_(attn.query.weight.data)
        return spec
    monkeypatch.setattr(f"{__name__}.build_hf_spec", with_twin_weights)
    report, _, stages = _run(tiny_bert, tmp_path / "out", max_accuracy_drop=1.0)
    params = stages["export.model"]["params"]
    assert "derived_from" not in params
    assert params["derive_skipped"] == ("smoothed Linear encoder.layer.0.attention.self.key has the same weight as "
                                        "another Linear: its initializer in the baseline graph is ambiguous: exported")
    assert report["fidelity"]["max_abs_deviation"] <= 1e-3 * report["fidelity"]["reference_max_abs"]


def test_only_recipes_that_change_nothing_but_smoothing_qualify():
    from sqexport.toolchain.pruning.magnitude import MagnitudePruneConfig
    from sqexport.toolchain.quantization.equalization import EqualizeConfig

    assert recipe_blocker(Recipe(stages=SMOOTH_INT8)) is None
    assert recipe_blocker(Recipe(stages=SMOOTH_INT8[1:])) is None  # no transform: the baseline graph itself
    prune = Stage("prune", "magnitude", MagnitudePruneConfig(sparsity=0.5))
    assert recipe_blocker(Recipe(stages=(prune,) + SMOOTH_INT8)) == "prune.magnitude changes the model: it is exported"
    equalize = Stage("transform", "equalize", EqualizeConfig())
    assert "transform.equalize" in recipe_blocker(Recipe(stages=(equalize, SMOOTH_INT8[1])))


def test_a_model_rebuilt_by_batchnorm_folding_is_exported(tiny_bert_spec):
    from torch import nn

    state = pipeline.RunState(Recipe(stages=SMOOTH_INT8), tiny_bert_spec, None, 1, pipeline.StageTimer(NULL_PROGRESS),
                              NULL_PROGRESS)
    state.work = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    state.baseline_graph = object()  # what export.baseline kept
    pipeline.fold(state)
    assert state.baseline_graph is None
    assert state.derive_skipped == ("fold_batchnorm rebuilt the model with torch.fx (1 BatchNorm layer(s) folded, "
                                    "0 branch sum(s) merged): it is exported")


def test_a_linear_added_since_the_baseline_is_refused(tiny_bert_spec, tmp_path):
    import copy

    work = copy.deepcopy(tiny_bert_spec.model)
    baseline = keep_baseline(export_model(tiny_bert_spec, work, tmp_path / "baseline.onnx"), work)
    work.extra = torch.nn.Linear(2, 2)
    with pytest.raises(GraphMismatch, match="Linears changed since the baseline export"):
        derive_prepared(baseline, work)
