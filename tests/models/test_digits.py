"""Built-in digits models and their data."""
import numpy as np
import pytest
import torch

from sqexport.models.digits import N_CALIB, N_EVAL, DigitsCNN, DigitsMLP, build_digits_spec
from sqexport.models.spec import ModelSpec


def test_split_is_fixed_and_well_formed(digits_split):
    s = digits_split
    assert s.x_eval.shape == (N_EVAL, 1, 8, 8) and s.x_calib.shape == (N_CALIB, 1, 8, 8)
    assert len(s.x_train) == 1797 - N_EVAL - N_CALIB
    for x in (s.x_train, s.x_calib, s.x_eval):
        assert x.dtype == np.float32 and x.min() >= 0.0 and x.max() <= 1.0
    assert set(np.unique(s.y_eval)) == set(range(10)) and s.y_eval.dtype == np.int64
    from sqexport.models.digits import digits_split as again

    np.testing.assert_array_equal(again().x_eval, s.x_eval)


@pytest.mark.parametrize("name, cls", [("digits-cnn", DigitsCNN), ("digits-mlp", DigitsMLP)])
def test_spec_and_shipped_weights(name, cls):
    spec = build_digits_spec(name)
    assert isinstance(spec, ModelSpec) and isinstance(spec.model, cls)
    assert spec.task == "image-classification" and spec.input_names == ["pixels"] and spec.output_names == ["logits"]
    assert spec.example_inputs["pixels"].shape == (1, 1, 8, 8)
    assert sum(len(b["pixels"]) for b in spec.calib_batches) == N_CALIB
    assert sum(len(b["pixels"]) for b in spec.eval_batches) == N_EVAL == len(spec.eval_labels)
    logits = np.concatenate([spec.torch_outputs(spec.model, b)[0] for b in spec.eval_batches])
    assert logits.shape == (N_EVAL, 10)
    assert (logits.argmax(1) == spec.eval_labels).mean() >= 0.95  # trained weights, not random


def test_torch_outputs_returns_numpy_in_output_order():
    spec = build_digits_spec("digits-mlp")
    out = spec.torch_outputs(spec.model, spec.example_inputs)
    assert isinstance(out, list) and isinstance(out[0], np.ndarray) and out[0].shape == (1, 10)
    with torch.no_grad():
        ref = spec.model(torch.from_numpy(spec.example_inputs["pixels"])).numpy()
    np.testing.assert_array_equal(out[0], ref)
