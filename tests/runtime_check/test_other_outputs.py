"""Outputs after the first (a detector's boxes beside its scores): the gate reads the first output
only, so the others are compared with FP32 per sample and shown in the console and the report."""
from __future__ import annotations

import json
import re
import sys

import numpy as np
import pytest

from sqexport.runtime_check.other_outputs import other_outputs


def test_cosine_per_sample_and_equal_share_by_hand():
    # two batches, each [boxes, labels]
    base = [[np.array([[3.0, 4.0], [1.0, 0.0]]), np.array([1, 2])], [np.array([[0.0, 2.0]]), np.array([5])]]
    model = [[np.array([[3.0, 4.0], [1.0, 1.0]]), np.array([1, 0])], [np.array([[0.0, -2.0]]), np.array([5])]]
    boxes, labels = other_outputs(["boxes", "labels"], base, model)
    # per sample: 1, 1/sqrt(2), -1
    assert boxes["cosine_min"] == pytest.approx(-1.0)
    assert boxes["cosine_mean"] == pytest.approx((1 + 2 ** -0.5 - 1) / 3)
    assert boxes["samples"] == 3
    assert labels == {"name": "labels", "equal_share": pytest.approx(2 / 3), "samples": 3}


def test_zero_outputs_and_a_shape_change():
    zero = [[np.zeros((2, 3))]]
    assert other_outputs(["z"], zero, zero)[0]["cosine_mean"] == 1.0
    assert other_outputs(["z"], [[np.ones((2, 3))]], zero)[0]["cosine_mean"] == 0.0  # an output lost to zeros
    ragged = [[np.zeros((1, 3))], [np.zeros((1, 4))]]
    row = other_outputs(["r"], ragged, ragged)[0]
    assert row["compared"] is False and "shape differs between batches" in row["why"]


NET = '''
import torch
from torch import nn

class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)
        self.box = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        f = torch.relu(self.conv(x))
        return self.fc(f.mean((2, 3))), self.box(f), self.fc(f.mean((2, 3))).argmax(1)

def build():
    torch.manual_seed(0)
    return TwoHeads().eval()
'''


def test_the_cli_shows_and_reports_every_output(tmp_path, monkeypatch, run_cli):
    (tmp_path / "twoheads.py").write_text(NET)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [str(tmp_path)] + sys.path)
    sys.modules.pop("twoheads", None)
    out = tmp_path / "o"
    r = run_cli(["twoheads:build", "--input-shape", "1x3x8x8", "--prune", "none", "-o", out])
    sys.modules.pop("twoheads", None)
    assert r.exit_code == 0, r.output
    lines = [line for line in r.output.splitlines() if "(not gated: the gate reads the first output)" in line]
    assert [re.search(r"output\s+(\S+):", line).group(1) for line in lines] == ["output_1", "output_2"]
    rep = json.loads((out / "report.json").read_text())
    box, label = rep["accuracy"]["other_outputs"]
    assert box["name"] == "output_1" and 0.99 < box["cosine_mean"] <= 1.0 + 1e-9 and box["samples"] == 64
    assert label["name"] == "output_2" and 0.0 <= label["equal_share"] <= 1.0
    assert "- output `output_1` (not gated): cosine to FP32" in (out / "report.md").read_text()
