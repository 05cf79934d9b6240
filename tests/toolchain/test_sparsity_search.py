"""The pruning amount nobody gave: chosen within the accuracy budget by bisection, reported, and
an explicit --sparsity still honoured exactly."""
from __future__ import annotations

import dataclasses
import json
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sqexport.toolchain.sparsity_search import GRID, MAX_SPARSITY, PRUNE_SHARE, choose_sparsity, cosine_floor


def _search(drop_of_sparsity, limit=1.0, fidelity_floor=0.0):
    """choose_sparsity with a fake model whose pruned drop is `drop_of_sparsity(s)` points."""
    model = torch.nn.Linear(4, 3)
    state = {"s": 0.0}
    base = np.tile(np.eye(3, dtype=np.float32), (34, 1))[:100] * 5  # 100 samples, 3 classes

    def outputs(m, batch):
        out = base.copy()
        flips = int(round(drop_of_sparsity(state["s"])))  # points on 100 samples = flipped samples
        out[:flips] = np.roll(out[:flips], 1, axis=1)
        return [out]
    spec = SimpleNamespace(model=model, task="image-classification", eval_batches=[{"x": None}], calib_batches=[],
                     eval_labels=None, torch_outputs=outputs, postprocess=lambda o, b: o[0])
    stage = SimpleNamespace(config=_Config(0.5))

    def handler(m, config, ctx):
        state["s"] = config.sparsity
    return choose_sparsity(spec, stage, lambda layers: None, handler, limit, fidelity_floor=fidelity_floor)


@dataclasses.dataclass(frozen=True)
class _Config:
    sparsity: float


def test_bisection_finds_the_largest_amount_within_the_budget():
    # drop grows by 1 point per 0.1 sparsity: budget 0.25 x 4 = 1 point -> 0.1 (1 point) fits, 0.15 (2) not
    choice = _search(lambda s: 10 * s if s >= 0.1 else 0.0, limit=4.0)
    assert choice.budget == pytest.approx(PRUNE_SHARE * 4.0)
    assert choice.sparsity == pytest.approx(0.1)
    tried = {t["sparsity"]: t for t in choice.trace}
    assert tried[0.1]["fits"] and not tried[0.15]["fits"]
    assert len(choice.trace) <= 5  # bisection over 10 grid points


def test_the_fidelity_floors_share_bounds_the_pruned_outputs_cosine():
    # one flipped sample of 100: 1 point of drop (within 0.25 x 8 = 2) and its one-hot output
    # orthogonal to the dense one: mean cosine 0.99 < 1 - 0.25 x (1 - 0.99) = 0.9975
    flip_past_02 = lambda s: 1.0 if s > 0.2 else 0.0  # noqa: E731
    assert cosine_floor(0.99) == pytest.approx(0.9975) and cosine_floor(0.0) == 0.0
    assert _search(flip_past_02, limit=8.0).sparsity == MAX_SPARSITY  # no floor: the drop alone decides
    choice = _search(flip_past_02, limit=8.0, fidelity_floor=0.99)
    assert choice.sparsity == pytest.approx(0.2) and choice.min_cosine == pytest.approx(0.9975)
    tried = {t["sparsity"]: t for t in choice.trace}
    assert tried[0.25]["cosine"] == pytest.approx(0.99) and 0 < tried[0.25]["drop"] <= 2.0  # within the budget
    assert not tried[0.25]["fits"] and tried[0.2]["fits"] and tried[0.2]["cosine"] == pytest.approx(1.0)
    assert "cosine to the dense model's at 0.9975 or more" in choice.why
    assert choice.to_report(8.0, "points")["min_cosine"] == pytest.approx(0.9975)


def test_nothing_fits_means_nothing_pruned_and_everything_fits_means_the_cap():
    assert _search(lambda s: 50.0 if s > 0 else 0.0).sparsity == 0.0
    free = _search(lambda s: 0.0)
    assert free.sparsity == MAX_SPARSITY == GRID[-1]


USER_CNN = '''
import torch
from torch import nn

class DigitsCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
                                      nn.ReLU(), nn.AdaptiveAvgPool2d(2))
        self.classifier = nn.Linear(128, 10)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))

def build():
    model = DigitsCNN()
    model.load_state_dict(torch.load("cnn.pt", weights_only=True))
    return model.eval()
'''


@pytest.fixture(scope="module")
def trained_cnn(tmp_path_factory):
    """A user's own 3-layer CNN trained on 8x8 digits (seeded, a few seconds)."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("usercnn")
    (root / "usercnn.py").write_text(USER_CNN)
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(x))
    train, calib, held = order[:1200], order[1200:1500], order[1500:]
    sys.path.insert(0, str(root))
    try:
        import usercnn
    finally:
        sys.path.remove(str(root))
    torch.manual_seed(0)
    model = usercnn.DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x[train]), torch.from_numpy(y[train])
    for _ in range(40):
        for i in range(0, len(xt), 100):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[i:i + 100]), yt[i:i + 100]).backward()
            opt.step()
    torch.save(model.state_dict(), root / "cnn.pt")
    np.savez(root / "calib.npz", x=x[calib], labels=y[calib])
    np.savez(root / "eval.npz", x=x[held], labels=y[held])
    with torch.no_grad():
        top1 = (model(torch.from_numpy(x[held])).argmax(1).numpy() == y[held]).mean()
    sys.modules.pop("usercnn", None)
    return root, float(top1)


@pytest.mark.e2e
def test_user_cnn_passes_its_gate_with_defaults(trained_cnn, run_cli, monkeypatch):
    root, top1 = trained_cnn
    assert top1 > 0.9
    monkeypatch.chdir(root)
    monkeypatch.setattr(sys, "path", list(sys.path))
    sys.modules.pop("usercnn", None)
    r = run_cli(["usercnn:build", "--input-shape", "1x1x8x8", "--calib-data", "calib.npz", "--eval-data", "eval.npz",
                 "-o", root / "out"])
    assert r.exit_code == 0, r.output
    rep = json.loads((root / "out" / "report.json").read_text())
    choice = rep["sparsity_choice"]
    assert 0.0 <= choice["chosen"] <= MAX_SPARSITY and choice["evaluation_samples"] == len(np.load(root / "eval.npz")["x"])
    assert all(t["fits"] == (t["drop"] <= choice["budget"]) for t in choice["tried"])
    assert choice["calibration_samples"] == len(np.load(root / "calib.npz")["x"])  # both splits score each amount
    assert all(t["drop"] == max(t["drop_evaluation"], t["drop_calibration"]) for t in choice["tried"])
    assert rep["recipe"]["stages"][0]["params"]["sparsity"] == choice["chosen"]
    assert rep["accuracy"]["drop"] <= 1.0 and abs(rep["accuracy"]["model"] - 100 * top1) <= 2.0
    assert "sparsity" in r.output and "chosen" in " ".join(rep["notes"])


@pytest.mark.e2e
def test_explicit_sparsity_is_honoured_exactly(trained_cnn, run_cli, monkeypatch):
    root, _ = trained_cnn
    monkeypatch.chdir(root)
    monkeypatch.setattr(sys, "path", list(sys.path))
    sys.modules.pop("usercnn", None)
    r = run_cli(["usercnn:build", "--input-shape", "1x1x8x8", "--calib-data", "calib.npz", "--eval-data", "eval.npz",
                 "--sparsity", "0.3", "--max-accuracy-drop", "100", "-o", root / "fixed", "--quiet"])
    assert r.exit_code == 0, r.output
    rep = json.loads((root / "fixed" / "report.json").read_text())
    assert "sparsity_choice" not in rep and "auto_sparsity" not in rep["recipe"]
    assert rep["recipe"]["stages"][0]["params"]["sparsity"] == 0.3
    assert rep["sparsity"]["overall"] == pytest.approx(0.3, abs=1e-3)


@pytest.mark.e2e
def test_user_cnn_as_torchscript_passes_its_gate_with_defaults(trained_cnn, run_cli, monkeypatch):
    root, top1 = trained_cnn
    monkeypatch.chdir(root)
    monkeypatch.setattr(sys, "path", list(sys.path))
    sys.path.insert(0, str(root))
    sys.modules.pop("usercnn", None)
    import usercnn
    scripted = torch.jit.trace(usercnn.build(), torch.rand(2, 1, 8, 8))
    sys.modules.pop("usercnn", None)
    torch.jit.save(scripted, str(root / "cnn_ts.pt"))
    r = run_cli(["cnn_ts.pt", "--input-shape", "1x1x8x8", "--calib-data", "calib.npz", "--eval-data", "eval.npz",
                 "-o", root / "ts"])
    assert r.exit_code == 0, r.output
    rep = json.loads((root / "ts" / "report.json").read_text())
    assert rep["source"]["kind"] == "TorchScript" and "sparsity_choice" in rep
    assert rep["quantization"]["coverage"]["fp32"] == []
    assert rep["accuracy"]["drop"] <= 1.0 and abs(rep["accuracy"]["model"] - 100 * top1) <= 2.0


class _NormedMlp(torch.nn.Module):
    """Linear -> BatchNorm -> ReLU -> Linear whose BatchNorm statistics fit the data N(0, 1) inputs
    give (a "pretrained" model)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.bn, self.fc2 = torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 4)
        self.bn.train()
        with torch.no_grad():
            self.bn.momentum = None
            self.fc1.weight.mul_(3.0)
            self.bn(self.fc1(torch.randn(4096, 8, generator=torch.Generator().manual_seed(1))))
        self.bn.momentum = 0.1
        self.eval()

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def _search_normed(calib_shift: float, weight_scale_at):
    """choose_sparsity on _NormedMlp; its "pruning" scales fc1's weight by weight_scale_at(s) (what
    removing weights does to the next norm's input statistics); calibration inputs are N(calib_shift, 1)."""
    g = torch.Generator().manual_seed(2)
    evals = [{"x": torch.randn(200, 8, generator=g).numpy()}]
    calib = [{"x": (torch.randn(24, 8, generator=g) + calib_shift).numpy()}]
    spec = SimpleNamespace(model=_NormedMlp(), task="image-classification", eval_batches=evals, calib_batches=calib,
                           eval_labels=None, torch_outputs=lambda m, b: [m(torch.from_numpy(b["x"])).detach().numpy()],
                           postprocess=lambda o, b: o[0])

    def handler(model, config, ctx):
        with torch.no_grad():
            model.fc1.weight.mul_(weight_scale_at(config.sparsity))
    return choose_sparsity(spec, SimpleNamespace(config=_Config(0.5)), lambda layers: None, handler, 4.0)


def test_batchnorm_statistics_are_kept_where_re_estimating_them_measures_worse():
    # pruning changes nothing; the 24 calibration samples come from elsewhere (a few photos)
    choice = _search_normed(calib_shift=2.0, weight_scale_at=lambda s: 1.0)
    assert choice.sparsity == MAX_SPARSITY and not choice.recalibrate_batchnorm
    for t in choice.trace:
        assert t["batchnorm"] == "kept" and t["drop"] == t["drop_batchnorm_kept"] == t["drop_calibration"] == 0.0
        assert t["drop_batchnorm_reestimated"] > 1.0


def test_batchnorm_statistics_are_re_estimated_where_that_measures_better():
    # pruning shrinks fc1's outputs (0.2x at 0.5); the calibration data is the evaluation kind, so
    # re-estimated statistics undo the shrinking
    choice = _search_normed(calib_shift=0.0, weight_scale_at=lambda s: 1.0 - 1.6 * s)
    chosen = {t["sparsity"]: t for t in choice.trace}[choice.sparsity]
    assert choice.recalibrate_batchnorm and chosen["batchnorm"] == "re-estimated"
    assert chosen["drop_evaluation"] == chosen["drop_batchnorm_reestimated"] < chosen["drop_batchnorm_kept"]
    for t in choice.trace:  # each amount counts its better variant (on the evaluation split), on both splits
        better = "re-estimated" if t["drop_batchnorm_reestimated"] < t["drop_batchnorm_kept"] else "kept"
        assert t["batchnorm"] == better
        assert t["drop_evaluation"] == min(t["drop_batchnorm_kept"], t["drop_batchnorm_reestimated"])
        assert t["drop"] == max(t["drop_evaluation"], t["drop_calibration"])
        assert t["fits"] == (t["drop"] <= choice.budget)
