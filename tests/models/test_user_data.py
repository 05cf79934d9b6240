"""Data for user models: held-out splits, seeded synthetic inputs, recorded preprocessing."""
import numpy as np
import pytest

from sqexport.contracts.errors import ConfigError, DataError
from sqexport.models.data import SYNTHETIC_SAMPLES, apply_user_data
from sqexport.models.image_data import ImagePrep
from sqexport.models.zoo import load_model


@pytest.fixture
def cnn(user_project):
    return load_model("mypkg.nets:tiny_cnn", input_shapes={None: (1, 3, 8, 8)})


def _rows(batches, name="image"):
    return np.concatenate([b[name] for b in batches])


def test_one_data_set_is_split_every_fourth_sample(cnn, tmp_path):
    x = np.arange(10, dtype=np.float32)[:, None, None, None] * np.ones((1, 3, 8, 8), np.float32)
    np.savez(tmp_path / "d.npz", image=x, labels=np.arange(10) % 4)
    spec = apply_user_data(cnn, str(tmp_path / "d.npz"), None)
    assert _rows(spec.eval_batches)[:, 0, 0, 0].tolist() == [3, 7]  # i % 4 == 3
    assert _rows(spec.calib_batches)[:, 0, 0, 0].tolist() == [0, 1, 2, 4, 5, 6, 8, 9]
    assert spec.eval_labels.tolist() == [3, 3] and spec.calib_labels.tolist() == [0, 1, 2, 0, 1, 2, 0, 1]
    assert spec.data_info["eval"]["samples"] == 2 and "held out" in spec.data_info["eval"]["split"]
    # eval data only: the small part calibrates, the rest evaluates
    only_eval = apply_user_data(cnn, None, str(tmp_path / "d.npz"))
    assert _rows(only_eval.calib_batches)[:, 0, 0, 0].tolist() == [3, 7]
    assert len(_rows(only_eval.eval_batches)) == 8


def test_no_data_gives_seeded_synthetic_inputs(cnn):
    a, b, c = (apply_user_data(cnn, None, None, seed=s) for s in (0, 0, 1))
    assert len(_rows(a.calib_batches)) == len(_rows(a.eval_batches)) == SYNTHETIC_SAMPLES
    np.testing.assert_array_equal(_rows(a.calib_batches), _rows(b.calib_batches))  # same seed, same data
    assert not np.array_equal(_rows(a.calib_batches), _rows(c.calib_batches))
    assert not np.array_equal(_rows(a.calib_batches), _rows(a.eval_batches))  # disjoint draws
    assert a.eval_labels is None and a.data_info["eval"]["source"] == "synthetic"
    assert "NO DATA" in a.data_info["notes"][0]


def test_image_folders_record_preprocessing(cnn, tmp_path, images_factory):
    calib = images_factory(tmp_path / "calib", ["a", "b"], 3)
    evals = images_factory(tmp_path / "eval", ["a", "b"], 2, seed=1)
    prep = ImagePrep(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), views=1)
    spec = apply_user_data(cnn, str(calib), str(evals), prep)
    assert _rows(spec.calib_batches).shape == (6, 3, 8, 8) and spec.eval_labels.tolist() == [0, 0, 1, 1]
    for split in ("calib", "eval"):
        info = spec.data_info[split]
        assert info["mean"] == [0.5] * 3 and info["std"] == [0.25] * 3 and info["class_names"] == ["a", "b"]
    assert "notes" not in spec.data_info


def test_data_errors(cnn, tmp_path, images_factory):
    many = images_factory(tmp_path / "many", [f"c{i}" for i in range(5)], 1)  # the model has 4 classes
    with pytest.raises(DataError, match="5 class folders; the model outputs 4 classes"):
        apply_user_data(cnn, str(many), None)
    a = images_factory(tmp_path / "a", ["x", "y"], 1)
    b = images_factory(tmp_path / "b", ["x", "z"], 1)
    with pytest.raises(DataError, match="different classes"):
        apply_user_data(cnn, str(a), str(b))
    np.save(tmp_path / "x.npy", np.zeros((4, 3, 8, 8), np.float32))
    with pytest.raises(ConfigError, match="apply to image-folder data"):
        apply_user_data(cnn, str(tmp_path / "x.npy"), None, ImagePrep(mean=(0.5,) * 3))
    with pytest.raises(DataError, match="no such data file or image folder"):
        apply_user_data(cnn, str(tmp_path / "missing"), None)


def test_builtin_models_record_their_splits():
    spec = apply_user_data(load_model("digits-mlp"), None, None)
    assert spec.data_info["eval"]["samples"] == 450 and "built-in" in spec.data_info["calib"]["source"]
