"""Layer-wise encoder distillation: the loss by hand, padding ignored, and recovery of a pruned
tiny BERT reducing it (hidden states and attention outputs of every layer)."""
import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel

from sqexport.toolchain.recovery import RecoveryConfig, lr_factor, recover
from sqexport.toolchain.recovery_data import TextPool
from sqexport.toolchain.recovery_encoder import EncoderOutputs, LossWeights, attention_modules, encoder_forward, encoder_loss


def test_loss_by_hand_on_real_tokens_only():
    t = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [9.0, 9.0]]])  # the third token is padding
    s = torch.tensor([[[1.0, 1.0], [0.0, 2.0], [-5.0, 3.0]]])
    mask = torch.tensor([[1, 1, 0]])
    only_hidden = encoder_loss(EncoderOutputs((s,), []), EncoderOutputs((t,), []), mask, LossWeights(1, 0, 0, 0))
    assert float(only_hidden) == pytest.approx(1.0 / 5.0)  # ||s - t||^2 = 1 over ||t||^2 = 1 + 4
    cos = encoder_loss(EncoderOutputs((s,), []), EncoderOutputs((t,), []), mask, LossWeights(0, 0, 1, 0))
    # pooled: s -> (0.5, 1.5), t -> (0.5, 1.0)
    expected = 1 - (0.25 + 1.5) / (np.hypot(0.5, 1.5) * np.hypot(0.5, 1.0))
    assert float(cos) == pytest.approx(expected, rel=1e-4)
    same = EncoderOutputs((t, t), [t])
    assert float(encoder_loss(same, same, mask)) == pytest.approx(0.0, abs=1e-7)


def test_warm_up_then_cosine_decay():
    assert lr_factor(0.0, 0.1) == pytest.approx(0.01)
    assert lr_factor(0.05, 0.1) == pytest.approx(0.51)
    assert lr_factor(0.1, 0.1) == pytest.approx(1.0)
    assert lr_factor(0.55, 0.1) == pytest.approx(0.5)
    assert lr_factor(1.0, 0.1) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(0.5, 0.0) == pytest.approx(0.5)


def _bert():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, initializer_range=0.3)
    return BertModel(cfg).eval()


def _pool():
    rng = np.random.default_rng(0)
    seqs = [[1] + rng.integers(5, 60, int(rng.integers(4, 14))).tolist() + [2] for _ in range(64)]
    return TextPool(seqs, ["input_ids", "attention_mask", "token_type_ids"], max_length=32)


def test_attention_outputs_are_tapped_per_layer():
    model = _bert()
    batch, _ = _pool().sample(4, torch.Generator().manual_seed(0))
    out = encoder_forward(model, batch, attention_modules(model))
    assert len(out.hidden) == 3 and len(out.attention) == 2
    assert out.attention[0].shape == out.hidden[1].shape
    assert attention_modules(torch.nn.Linear(2, 2)) == []  # not BERT-style: hidden states only


def test_recovery_of_a_pruned_tiny_bert_reduces_the_layerwise_loss():
    teacher, student = _bert(), _bert()
    student.prune_heads({0: [0, 1], 1: [2]})
    with torch.no_grad():  # FFN damage, as neuron removal without a refit would leave
        for lay in student.encoder.layer:
            lay.output.dense.weight[:, ::2] = 0
            lay.attention.output.dense.weight.mul_(0.5)
    pool = _pool()
    batch, _ = pool.sample(32, torch.Generator().manual_seed(5))
    taps = (attention_modules(student), attention_modules(teacher))

    def loss():
        with torch.no_grad():
            return float(encoder_loss(encoder_forward(student, batch, taps[0]),
                                      encoder_forward(teacher, batch, taps[1]), batch["attention_mask"]))

    before = loss()
    info = recover(student, teacher, pool, RecoveryConfig(steps=40, lr=3e-3, batch_size=16), seed=0)
    assert info["steps"] == 40
    assert loss() < 0.5 * before
    assert not student.training  # dropout stayed off, and the model is back in eval mode


def test_thread_picker_keeps_the_faster_setting_and_restores():
    from sqexport.toolchain.recovery_threads import ThreadPicker

    original = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        picker = ThreadPicker(None, trials=2)
        seen = []
        for step, per_unit in enumerate([9.0, 5.0, 1.0, 5.0, 1.0]):  # step 0: warm-up, not counted
            picker.before(step)
            seen.append(torch.get_num_threads())
            picker.after(step, per_unit * 10, 10)
        assert seen == [2, 2, 1, 2, 1] and picker.chosen == 1
        picker.before(5)
        assert torch.get_num_threads() == 1
        assert picker.record() == {"threads": 1, "thread_trials": {"2": [5.0, 5.0], "1": [1.0, 1.0]}}
        picker.restore()
        assert torch.get_num_threads() == 2
        fixed = ThreadPicker(3)
        fixed.before(0)
        assert fixed.chosen == 3 and torch.get_num_threads() == 3 and fixed.record()["thread_trials"] == {}
        fixed.restore()
    finally:
        torch.set_num_threads(original)


def test_recovery_keeps_embedding_tables_fixed_unless_asked():
    teacher = _bert()
    tables = {n: p.clone() for n, p in teacher.embeddings.named_parameters() if "embeddings.weight" in n}
    assert set(tables) == {"word_embeddings.weight", "position_embeddings.weight", "token_type_embeddings.weight"}
    for freeze in (True, False):
        student = _bert()
        student.prune_heads({0: [0]})
        info = recover(student, teacher, _pool(), RecoveryConfig(steps=3, lr=3e-3, batch_size=8,
                                                                freeze_embeddings=freeze), seed=0)
        now = dict(student.embeddings.named_parameters())
        same = all(torch.equal(now[n], t) for n, t in tables.items())
        assert same is freeze
        assert info["frozen_params"] == (sum(t.numel() for t in tables.values()) if freeze else 0)
        # the embeddings' LayerNorm is not a lookup table: it trains either way
        assert not torch.equal(student.embeddings.LayerNorm.weight, teacher.embeddings.LayerNorm.weight)
