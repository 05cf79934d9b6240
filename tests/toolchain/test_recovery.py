"""Recovery: distillation reduces the loss on a tiny pruned model; augmentation and budgets."""
import numpy as np
import pytest
import torch
from torch import nn

from sqexport.contracts.errors import ConfigError
from sqexport.toolchain.recovery import RecoveryConfig, distill_loss, recover
from sqexport.toolchain.recovery_data import ImagePool, TextPool, make_pool


def _teacher():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)).eval()


class _Wrap(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, img):
        return self.net(img)


def _data(n=64):
    rng = np.random.default_rng(0)
    return [{"img": rng.random((n, 1, 6, 6), dtype=np.float32)}]


def test_distillation_reduces_the_loss_and_is_deterministic():
    teacher = _Wrap(_teacher())
    results = []
    for _ in range(2):
        student = _Wrap(_teacher())
        with torch.no_grad():
            student.net[0].weight.mul_(0.3)  # damaged, as pruning would leave it
        pool = make_pool(_data(), None, text=False, encoder=False)
        info = recover(student, teacher, pool, RecoveryConfig(steps=60, lr=3e-3, batch_size=16), seed=1)
        results.append((info, student.net[0].weight.clone()))
    info = results[0][0]
    assert info["steps"] == 60 and info["device"] in ("cpu", "cuda")
    first = np.mean([p[1] for p in info["loss_curve"][:5]])
    last = np.mean([p[1] for p in info["loss_curve"][-5:]])
    assert last < 0.5 * first
    torch.testing.assert_close(results[0][1], results[1][1])  # same seed, same weights
    assert not any(p.requires_grad for p in student.parameters())


def test_pruning_masks_hold_through_recovery():
    """Masked weights get gradients too; recovery re-applies the masks after every step."""
    teacher, student = _Wrap(_teacher()), _Wrap(_teacher())
    mask = torch.rand(student.net[3].weight.shape, generator=torch.Generator().manual_seed(0)) > 0.5
    with torch.no_grad():
        student.net[3].weight.mul_(mask)
    pool = make_pool(_data(), None, text=False, encoder=False)
    recover(student, teacher, pool, RecoveryConfig(steps=5, lr=3e-3, batch_size=16), masks={"net.3": mask})
    assert torch.all(student.net[3].weight[~mask] == 0) and torch.any(student.net[3].weight[mask] != 0)


def test_kl_is_zero_when_student_matches_teacher_and_labels_add_cross_entropy():
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    cfg = RecoveryConfig(temperature=2.0, label_weight=0.5)
    assert float(distill_loss(logits, logits, {}, None, cfg, encoder=False)) == pytest.approx(0.0, abs=1e-7)
    ce = float(nn.functional.cross_entropy(logits, torch.tensor([0])))
    assert float(distill_loss(logits, logits, {}, torch.tensor([0]), cfg, False)) == pytest.approx(0.5 * ce)


def test_image_pool_shifts_and_flips_only_without_labels():
    x = np.arange(2 * 1 * 4 * 4, dtype=np.float32).reshape(2, 1, 4, 4)
    pool = ImagePool({"img": x}, np.array([0, 1]), shift=1)
    batch, labels = pool.sample(8, torch.Generator().manual_seed(0))
    assert batch["img"].shape == (2, 1, 4, 4) and labels is not None
    # a shifted crop of a padded image: every value comes from the source image or the zero padding
    assert set(batch["img"].unique().tolist()) <= set(x.flatten().tolist()) | {0.0}


def test_text_pool_drops_tokens_and_mixes_sentences():
    seqs = [[101] + list(range(1000, 1020)) + [102], [101] + list(range(2000, 2010)) + [102]]
    pool = TextPool(seqs, ["input_ids", "attention_mask", "token_type_ids"], max_length=64)
    batch, _ = pool.sample(64, torch.Generator().manual_seed(0))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape == batch["token_type_ids"].shape
    lengths = mask.sum(1)
    assert (ids[:, 0] == 101).all()
    assert (ids[torch.arange(len(ids)), lengths - 1] == 102).all()
    assert (lengths < 22).any()  # token dropout shortened some
    mixed = [(row[:n] >= 2000).any() and (row[:n] >= 1000).logical_and(row[:n] < 1020).any()
             for row, n in zip(ids, lengths)]
    assert any(mixed)  # some samples carry both sentences


def test_text_pool_replaces_tokens_from_its_own_vocabulary_only_without_labels(monkeypatch):
    import sqexport.toolchain.recovery_data as data

    monkeypatch.setattr(data, "MIX_PROB", 0.0)  # no mixing: tokens of the other text come from replacement
    seqs = [[101] + list(range(1000, 1040)) + [102], [101] + list(range(2000, 2040)) + [102]]
    names = ["input_ids", "attention_mask"]
    batch, _ = TextPool(seqs, names, max_length=128).sample(64, torch.Generator().manual_seed(0))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    body = [row[1:n - 1].tolist() for row, n in zip(ids, mask.sum(1))]
    assert all(1000 <= t < 1040 or 2000 <= t < 2040 for b in body for t in b)  # only the pool's tokens
    assert any(not (all(t < 2000 for t in b) or all(t >= 2000 for t in b)) for b in body)
    labeled = TextPool(seqs, names, max_length=128, labels=np.array([0, 1]))
    batch, _ = labeled.sample(64, torch.Generator().manual_seed(0))
    for row, n in zip(batch["input_ids"], batch["attention_mask"].sum(1)):
        b = row[1:n - 1].tolist()
        assert b == sorted(b) and len(set(b)) == len(b) and (max(b) < 2000 or min(b) >= 2000)  # drops only


def test_recovery_reports_the_metric_on_training_samples_too():
    teacher, student = _Wrap(_teacher()), _Wrap(_teacher())
    with torch.no_grad():
        student.net[0].weight.mul_(0.3)
    pool = make_pool(_data(), None, text=False, encoder=False)
    calls = []

    def held_out(model):
        calls.append("held_out")
        return 1.0

    def train(model):
        calls.append("train")
        return 2.0

    info = recover(student, teacher, pool, RecoveryConfig(steps=2, lr=1e-3, batch_size=8), evaluate=held_out,
                   evaluate_train=train)
    assert info["metric_before"] == info["metric_after"] == 1.0
    assert info["train_metric_before"] == info["train_metric_after"] == 2.0
    assert calls == ["held_out", "train", "held_out", "train"]
    info = recover(student, teacher, pool, RecoveryConfig(steps=1, lr=1e-3, batch_size=8))
    assert info["train_metric_before"] is None and info["train_metric_after"] is None


def test_config_validation():
    with pytest.raises(ConfigError, match="recovery steps must be >= 1, got 0"):
        RecoveryConfig(steps=0)
    with pytest.raises(ConfigError, match="recovery minutes must be > 0, got 0"):
        RecoveryConfig(minutes=0)
