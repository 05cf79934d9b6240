"""BN re-estimation sets running stats to the calibration data's statistics."""
import pytest
import torch
from torch import nn

from sqexport.toolchain.bn_recalibration import recalibrate_batchnorm


def _run(model, batch):
    return model(batch)


BATCHES = [torch.tensor([[1.0, 10.0], [3.0, 20.0]]), torch.tensor([[5.0, 30.0], [7.0, 40.0]])]


def test_running_stats_become_the_data_statistics():
    bn = nn.BatchNorm1d(2)
    with torch.no_grad():
        bn.running_mean.fill_(100.0)
        bn.running_var.fill_(100.0)
    model = nn.Sequential(nn.Dropout(0.9), bn).eval()
    assert recalibrate_batchnorm(model, BATCHES, _run) == 1
    # cumulative average of batch means [2, 15] and [6, 35]; of unbiased batch variances [2, 50] twice
    torch.testing.assert_close(bn.running_mean, torch.tensor([4.0, 25.0]))
    torch.testing.assert_close(bn.running_var, torch.tensor([2.0, 50.0]))
    assert bn.num_batches_tracked.item() == 2
    # dropout stayed off (the means would be scaled otherwise); modes and momentum restored
    assert not model.training and not bn.training and not model[0].training
    assert bn.momentum == 0.1


def test_single_batch_equals_numpy_statistics():
    torch.manual_seed(0)
    x = torch.randn(64, 3, 5, 5) * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1) + torch.tensor([0.0, -3.0, 4.0]).view(1, 3, 1, 1)
    bn = nn.BatchNorm2d(3).eval()
    recalibrate_batchnorm(bn, [x], _run)
    flat = x.transpose(0, 1).reshape(3, -1).double()
    torch.testing.assert_close(bn.running_mean.double(), flat.mean(1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bn.running_var.double(), flat.var(1, unbiased=True), atol=1e-4, rtol=1e-5)


def test_model_without_bn_is_untouched():
    lin = nn.Linear(2, 2)
    before = {k: v.clone() for k, v in lin.state_dict().items()}
    assert recalibrate_batchnorm(lin, BATCHES, _run) == 0
    for k, v in lin.state_dict().items():
        assert torch.equal(v, before[k])


@pytest.mark.e2e
def test_a_prune_stage_that_removed_nothing_re_estimates_nothing(run_cli, tmp_path):
    import json

    out = tmp_path / "out"
    r = run_cli(["digits-cnn", "--sparsity", "0", "--quiet", "-o", out])
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "report.json").read_text())
    names = [s.get("name") or s.get("stage") for s in rep["stages"]]
    assert "prune.magnitude" in names and "recalibrate_batchnorm" not in names
    assert rep["sparsity"]["overall"] == 0.0
    assert rep["quantization"]["predicted_drop_fp32_pruned"] == 0.0  # the model the fallback compares is the dense one
