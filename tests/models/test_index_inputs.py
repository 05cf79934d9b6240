"""User models whose inputs are ids: --input-shape gives no dtype, so an input the model reads as
indices into an embedding table is found by running it (int64), a Hugging Face-style forward names
its inputs as keyword parameters with defaults, and a dict-like output (ModelOutput) gives its
tensors in order."""
from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import pytest
import torch

from sqexport.models.user_model import load_user_model

NETS = '''
import torch
from torch import nn


class TextCNN(nn.Module):  # token ids in, one embedding table
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, tokens):
        return self.fc(torch.relu(self.conv(self.emb(tokens).transpose(1, 2))).amax(2))


class IdsAndFeatures(nn.Module):  # a recommender's form: category ids beside float features
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 4)
        self.dense = nn.Linear(6, 4)
        self.fc = nn.Linear(8, 2)

    def forward(self, features, category):
        return self.fc(torch.cat([torch.relu(self.dense(features)), self.emb(category).mean(1)], 1))


class KeywordOutputs(nn.Module):  # Hugging Face's calling form: keyword inputs, a dict out, a constant made in forward
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30, 8)
        self.fc = nn.Linear(8, 4)

    def forward(self, input_ids=None, attention_mask=None, return_dict=True):
        scale = torch.tensor(0.5)
        logits = self.fc(self.emb(input_ids).mean(1)) * scale
        return {"logits": logits}


def textcnn():
    torch.manual_seed(0)
    return TextCNN().eval()


def ids_and_features():
    torch.manual_seed(0)
    return IdsAndFeatures().eval()


def keyword_outputs():
    torch.manual_seed(0)
    return KeywordOutputs().eval()
'''


@pytest.fixture
def id_project(tmp_path, monkeypatch):
    (tmp_path / "idnets.py").write_text(NETS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [str(tmp_path)] + sys.path)
    sys.modules.pop("idnets", None)
    yield tmp_path
    sys.modules.pop("idnets", None)


def test_an_input_read_as_embedding_ids_is_int64(id_project):
    spec = load_user_model("idnets:textcnn", {None: (1, 12)})
    assert spec.example_inputs["tokens"].dtype == np.int64


def test_only_the_id_input_is_int64_beside_float_features(id_project):
    spec = load_user_model("idnets:ids_and_features", {"features": (1, 6), "category": (1, 3)})
    assert spec.example_inputs["features"].dtype == np.float32
    assert spec.example_inputs["category"].dtype == np.int64


def test_keyword_inputs_dict_outputs_and_constants_made_in_forward(id_project):
    spec = load_user_model("idnets:keyword_outputs", {"input_ids": (1, 7)})
    assert spec.input_names == ["input_ids"] and spec.example_inputs["input_ids"].dtype == np.int64
    assert spec.source["graph_capture"]["rebuilt"] is True  # torch.tensor(0.5) in forward: exported as a copy


def test_torchscript_text_model_runs_end_to_end(id_project, run_cli):
    import idnets
    torch.jit.save(torch.jit.trace(idnets.textcnn(), (torch.zeros(1, 12, dtype=torch.int64),)), "text.pt")
    out = id_project / "o"
    r = run_cli(["text.pt", "--input-shape", "1x12", "--prune", "none", "-o", out, "--quiet"])
    assert r.exit_code == 0, r.output
    model = onnx.load(str(out / "model.onnx"))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT64
    rep = json.loads((out / "report.json").read_text())
    assert rep["quantization"]["coverage"]["int8"] == 2


def test_a_model_failing_every_way_reports_its_own_error(id_project):
    from sqexport.contracts.errors import ModelLoadError
    with pytest.raises(ModelLoadError, match="fails on the example input"):
        load_user_model("idnets:textcnn", {None: (1, 12, 3)})  # 3-D ids: the embedding's output breaks the conv


def test_probing_for_ids_leaves_batchnorm_statistics_and_the_callers_module_alone():
    from torch import nn

    from sqexport.models.user_model import load_module_model

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.bn = nn.BatchNorm1d(4)
            self.fc = nn.Linear(4, 2)

        def forward(self, ids):
            return self.fc(self.bn(self.emb(ids).mean(1)))

    torch.manual_seed(0)
    module = Net().train()  # as a user may hand it over
    before = module.bn.running_mean.clone(), module.bn.num_batches_tracked.clone()
    spec = load_module_model(module, input_shapes={None: (1, 5)})
    assert spec.example_inputs["ids"].dtype == np.int64
    assert module.training and torch.equal(module.bn.running_mean, before[0])
    assert torch.equal(module.bn.num_batches_tracked, before[1])
    bn = next(m for m in spec.model.modules() if isinstance(m, nn.BatchNorm1d))
    assert torch.equal(bn.running_mean, before[0])  # the copy's statistics are the module's own
