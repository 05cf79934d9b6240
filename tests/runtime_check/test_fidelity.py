"""The onnxruntime-vs-torch fidelity check covers the leading evaluation batches only."""
import numpy as np
import torch

from sqexport.models.spec import ModelSpec
from sqexport.runtime_check.verify import FIDELITY_SAMPLES, fidelity_batches, fidelity_of


def _spec(batch_sizes: list[int]) -> ModelSpec:
    rng = np.random.default_rng(0)
    batches = [{"input": rng.standard_normal((n, 4)).astype(np.float32)} for n in batch_sizes]
    return ModelSpec("tiny", torch.nn.Linear(4, 3), "image-classification", ["input"], ["logits"], batches[0], [], batches)


def test_fidelity_runs_the_reference_on_the_leading_batches_only():
    spec = _spec([12] * 6)  # 72 samples; 32 need three whole batches (36 samples)
    model = spec.model.eval()
    called = []

    def reference(batch):
        called.append(id(batch))
        return spec.torch_outputs(model, batch)

    exact = np.concatenate([spec.torch_outputs(model, b)[0] for b in spec.eval_batches])
    onnx_out = exact.copy()
    onnx_out[36:] += 5.0  # rows past the covered batches are not compared
    fid = fidelity_of(spec, reference, onnx_out)
    assert called == [id(b) for b in spec.eval_batches[:3]]
    assert (fid["samples"], fid["eval_samples"]) == (36, 72)
    assert fid["max_abs_deviation"] == 0.0 and fid["argmax_agreement"] == 1.0
    onnx_out[35, 0] += 0.25  # the last covered row is compared
    assert np.isclose(fidelity_of(spec, reference, onnx_out)["max_abs_deviation"], 0.25, atol=1e-6)


def test_fewer_evaluation_samples_than_the_bound_are_all_covered():
    spec = _spec([5, 7])
    assert fidelity_batches(spec) == spec.eval_batches and FIDELITY_SAMPLES > 12
    out = np.concatenate([spec.torch_outputs(spec.model, b)[0] for b in spec.eval_batches])
    fid = fidelity_of(spec, lambda b: spec.torch_outputs(spec.model, b), out)
    assert (fid["samples"], fid["eval_samples"]) == (12, 12)
