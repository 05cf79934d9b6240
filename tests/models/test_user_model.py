"""User models: pkg.module:factory, TorchScript .pt, ExportedProgram .pt2 and --input-shape."""
import os
import re
import sys

import numpy as np
import pytest
import torch
from torch import nn

from sqexport.contracts.errors import ConfigError, ModelLoadError
from sqexport.models.user_model import load_user_model, parse_input_shapes
from sqexport.models.zoo import load_model


def _net():
    sys.path.insert(0, os.getcwd())  # the user_project fixture restores sys.path
    from mypkg.nets import tiny_cnn

    return tiny_cnn()


def _set_bn_stats(model):
    with torch.no_grad():  # non-trivial running stats, so a wrong BN rebuild would show
        bn = model.features[1]
        bn.running_mean.copy_(torch.linspace(-0.5, 0.5, 8))
        bn.running_var.copy_(torch.linspace(0.5, 2.0, 8))
    return model


def test_parse_input_shapes():
    assert parse_input_shapes(["1x3x32x32"]) == {None: (1, 3, 32, 32)}
    assert parse_input_shapes(["a=1x3", "b=2X4"]) == {"a": (1, 3), "b": (2, 4)}
    assert parse_input_shapes(["a=1x3, b=2x4", "c=5,"]) == {"a": (1, 3), "b": (2, 4), "c": (5,)}
    not_dims, twice = "dimensions must be positive integers joined by 'x'", "give one unnamed shape, or one NAME=shape"
    for bad, words in ((["1x0x3"], not_dims), (["1x-3"], not_dims), (["x"], not_dims), (["a=1xb"], not_dims),
                       (["1x3", "2x3"], twice), (["1x3,2x3"], twice), (["a=1", "a=2"], twice), (["a=1", "4"], twice), (["1.5x2"], not_dims)):
        with pytest.raises(ConfigError, match=f"--input-shape '{bad[-1].split(',')[-1]}': {words}"):
            parse_input_shapes(bad)


def test_factory_spec(user_project):
    spec = load_model("mypkg.nets:tiny_cnn", input_shapes={None: (1, 3, 32, 32)})
    assert spec.input_names == ["image"]  # from forward(self, image)
    assert spec.example_inputs["image"].shape == (1, 3, 32, 32)
    assert spec.task == "image-classification" and spec.output_names == ["output"]
    assert spec.dynamic_axes["image"] == {0: "batch"} and spec.calib_batches == []
    assert spec.source["kind"] == "factory" and spec.source["input_shapes"] == {"image": [1, 3, 32, 32]}


def test_non_2d_output_is_compared_by_cosine(user_project):
    spec = load_model("mypkg.nets:feature_map", input_shapes={None: (1, 3, 5, 5)})
    assert spec.task == "feature-extraction" and spec.input_names == ["x"]
    out = spec.postprocess(spec.torch_outputs(spec.model, spec.example_inputs), spec.example_inputs)
    assert out.shape == (1, 4 * 5 * 5)


@pytest.mark.parametrize("ref, shapes, error, words", [
    ("nopkg.nets:tiny_cnn", ["1x3x8x8"], ModelLoadError, "cannot import 'nopkg.nets'"),
    ("mypkg.nets:missing", ["1x3x8x8"], ModelLoadError, "has no attribute 'missing'"),
    ("mypkg.nets:not_a_module", ["1x3x8x8"], ModelLoadError, "returned a int, not a torch.nn.Module"),
    ("mypkg.nets:broken", ["1x3x8x8"], ModelLoadError, "broken() failed: RuntimeError: weights missing"),
    ("mypkg.nets:NOT_CALLABLE", ["1x3x8x8"], ModelLoadError, "not a callable"),
    ("mypkg.nets:tiny_cnn", ["1x1x8x8"], ModelLoadError, "fails on the example input"),
    ("mypkg.nets:tiny_cnn", ["other=1x3x8x8"], ConfigError, "unknown input(s) other; the model's inputs: image"),
    ("mypkg.nets:two_inputs", ["a=1x3;b=1x3"], ConfigError, "give several as NAME=shape,NAME=shape or repeat"),
    ("mypkg.nets:two_inputs", ["1x3"], ConfigError, "2 inputs (a, b)"),
    ("mypkg.nets:two_inputs", ["a=1x3"], ConfigError, "shape of 'b' is not known"),
    ("mypkg.nets:tiny_cnn", [], ConfigError, "give --input-shape"),
])
def test_factory_errors(user_project, ref, shapes, error, words):
    with pytest.raises(error, match=re.escape(words)) as info:
        load_user_model(ref, parse_input_shapes(shapes))
    assert "\n" not in str(info.value)


def test_two_named_inputs(user_project):
    spec = load_user_model("mypkg.nets:two_inputs", parse_input_shapes(["b=1x3", "a=1x3"]))
    assert spec.input_names == ["a", "b"]  # forward order, not flag order


@pytest.mark.parametrize("kind", ["torchscript", "exported", "core-aten"])
def test_files_rebuild_real_layers_with_their_names(user_project, kind):
    model = _set_bn_stats(_net())
    x = torch.rand(3, 3, 16, 16)
    if kind == "torchscript":
        path = user_project / "net.pt"
        torch.jit.save(torch.jit.trace(model, x), str(path))
        spec = load_model(str(path), input_shapes={None: (1, 3, 16, 16)})
    else:
        path = user_project / "net.pt2"
        ep = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
        if kind == "core-aten":  # convolution, addmm(bias, x, permute(w)), native batch norm
            ep = ep.run_decompositions()
        torch.export.save(ep, str(path))
        spec = load_model(str(path))  # the program records its input shape
    types = {n: type(m) for n, m in spec.model.named_modules()}
    assert types["features.0"] is nn.Conv2d and types["features.1"] is nn.BatchNorm2d
    assert types["features.3"] is nn.Conv2d and types["head"] is nn.Linear
    assert spec.input_names == ["image"] and spec.example_inputs["image"].shape == (1, 3, 16, 16)
    for n in (1, 5):  # the batch dimension stays free
        xb = torch.rand(n, 3, 16, 16)
        got = spec.torch_outputs(spec.model, {"image": xb.numpy()})[0]
        np.testing.assert_allclose(got, model(xb).detach().numpy(), atol=1e-5)


def test_exported_program_with_a_fixed_batch_is_refused(user_project):
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(12, 2)

        def forward(self, x):
            return self.fc(x.view(x.shape[0], -1))

    path = user_project / "fixed.pt2"
    torch.export.save(torch.export.export(Flat().eval(), (torch.rand(1, 3, 4),)), str(path))
    with pytest.raises(ModelLoadError, match="batch size 1 only"):
        load_model(str(path))


def test_state_dict_and_pickled_module_say_what_is_supported(user_project):
    torch.save(_net().state_dict(), "sd.pt")
    torch.save(_net(), "whole.pth")
    for name in ("sd.pt", "whole.pth"):
        with pytest.raises(ModelLoadError, match="not a TorchScript file.*pkg.module:factory"):
            load_model(name, input_shapes={None: (1, 3, 8, 8)})


def test_input_shape_only_for_user_models():
    with pytest.raises(ModelLoadError, match="--input-shape gives the example input"):
        load_model("digits-cnn", input_shapes={None: (1, 1, 8, 8)})
