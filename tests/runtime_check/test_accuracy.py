"""Task metrics against hand-computed values."""
import math

import numpy as np
import pytest

from sqexport.runtime_check.accuracy import (
    classification_metrics, embedding_metrics, run_session, softmax_kl, spearman, topk_agreement,
)


def _logits(preds, n_classes=3):
    return np.eye(n_classes, dtype=np.float32)[preds]


def test_classification_with_labels():
    m = classification_metrics(_logits([0, 1, 2, 1]), _logits([0, 1, 1, 1]), np.array([0, 1, 2, 2]))
    assert m["metric"] == "top1" and m["unit"] == "%" and m["drop_unit"] == "points"
    assert m["baseline"] == 75.0 and m["model"] == 50.0
    assert m["drop"] == pytest.approx(25.0) and "drop_points" not in m  # one unit per metric
    assert m["agreement_with_baseline"] == 75.0


def test_classification_without_labels_is_the_top1_fp32_expects():
    # one-hot logits: FP32's softmax gives its class e/(e+2), each other class 1/(e+2)
    m = classification_metrics(_logits([0, 1, 2, 1]), _logits([0, 1, 1, 1]), None)
    assert m["metric"] == "top1_expected" and (m["unit"], m["drop_unit"]) == ("%", "points")
    hi, lo = math.e / (math.e + 2), 1 / (math.e + 2)
    assert m["baseline"] == pytest.approx(100 * hi, rel=1e-6)
    assert m["model"] == pytest.approx(100 * (3 * hi + lo) / 4, rel=1e-6)
    assert m["drop"] == pytest.approx(100 * (hi - lo) / 4, rel=1e-6)  # 9.1 points, where agreement loses 25
    assert m["agreement_with_baseline"] == 75.0 and "no labels" in m["note"]


def test_without_labels_a_flip_costs_what_fp32_believes():
    """A flip between two classes FP32 holds equally likely costs nothing; a flip away from a
    confident prediction costs its confidence."""
    unsure = np.array([[2.0, 2.0, -9.0]], np.float32)  # FP32 argmax 0, class 1 equally likely
    sure = np.array([[9.0, 0.0, 0.0]], np.float32)
    to_class_1 = np.array([[0.0, 1.0, 0.0]], np.float32)
    assert classification_metrics(unsure, to_class_1, None)["drop"] == pytest.approx(0.0, abs=1e-6)
    confident = classification_metrics(sure, to_class_1, None)
    p_top = math.exp(9) / (math.exp(9) + 2)
    assert confident["drop"] == pytest.approx(100 * (p_top - 1 / (math.exp(9) + 2)), rel=1e-6)
    assert confident["agreement_with_baseline"] == 0.0


def test_model_better_than_baseline_gives_negative_drop():
    m = classification_metrics(_logits([1, 1]), _logits([0, 1]), np.array([0, 1]))
    assert m["drop"] == pytest.approx(-50.0)


def test_spearman_hand_values():
    # ranks a: 0..4 ; b = [5, 6, 7, 8, 7] -> ranks [0, 1, 2.5, 4, 2.5] (tie averaged)
    # centered: a [-2 -1 0 1 2], b [-2 -1 .5 2 .5]; sum ab = 4+1+0+2+1 = 8, sum a^2 = 10, sum b^2 = 9.5
    assert spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / math.sqrt(95))
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [1, 4, 9]) == pytest.approx(1.0)  # monotone, not linear
    assert spearman([1, 1, 1], [1, 2, 3]) == 1.0  # constant: defined as 1


def test_embedding_metrics_hand_values():
    base = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], np.float32)
    model = np.array([[2.0, 0.0], [1.0, 1.0], [1.0, 1.0]], np.float32)
    m = embedding_metrics(base, model)
    # cosines: 1, 1/sqrt(2), 1 (scale does not matter)
    mean = (2 + 1 / math.sqrt(2)) / 3
    assert m["metric"] == "cosine" and m["baseline"] == 1.0
    assert m["model"] == pytest.approx(mean)
    assert m["drop"] == pytest.approx(1 - mean)
    assert m["min_cosine"] == pytest.approx(1 / math.sqrt(2))
    # pairwise sims (01, 02, 12): base [0, .707, .707] -> ranks [0, 1.5, 1.5];
    # model [.707, .707, 1] -> ranks [.5, .5, 2]; centered products .5 - .25 + .5 = .75, norms 1.5 -> 0.5
    assert m["spearman"] == pytest.approx(0.5)


def test_identical_embeddings():
    rng = np.random.default_rng(0)
    e = rng.normal(size=(6, 4))
    m = embedding_metrics(e, e)
    assert m["model"] == pytest.approx(1.0) and m["drop"] == pytest.approx(0.0, abs=1e-12)
    assert m["spearman"] == pytest.approx(1.0)


def test_run_session_feeds_only_graph_inputs_and_concatenates():
    class FakeSession:
        def get_inputs(self):
            class I:
                name = "x"
            return [I()]

        def run(self, names, feed):
            assert set(feed) == {"x"}
            return [feed["x"] * 2]

    batches = [{"x": np.ones((2, 3)), "extra": np.zeros(1)}, {"x": np.full((1, 3), 3.0), "extra": np.zeros(1)}]
    out = run_session(FakeSession(), batches, lambda outs, batch: outs[0])
    np.testing.assert_array_equal(out, [[2, 2, 2], [2, 2, 2], [6, 6, 6]])


def test_softmax_kl_hand_values():
    # softmax([0, 0]) = [.5, .5], softmax([ln 3, 0]) = [.75, .25]:
    # KL = .5 ln(.5/.75) + .5 ln(.5/.25) = .5 ln(4/3)
    base = np.array([[0.0, 0.0], [1.0, 2.0]])
    model = np.array([[math.log(3.0), 0.0], [11.0, 12.0]])  # a constant shift changes nothing
    kl = softmax_kl(base, model)
    assert kl[0] == pytest.approx(0.5 * math.log(4 / 3)) and kl[1] == pytest.approx(0.0, abs=1e-12)
    assert softmax_kl(base, base) == pytest.approx([0.0, 0.0], abs=1e-12)


def test_top5_agreement_compares_sets():
    base = np.array([[9, 8, 7, 6, 5, 0, 0], [9, 8, 7, 6, 5, 0, 0]], np.float32)
    same_set = np.array([[5, 6, 7, 8, 9, 0, 0], [9, 8, 7, 6, 0, 5, 0]], np.float32)  # row 2 swaps class 4 for 5
    assert topk_agreement(base, same_set, 5) == 0.5
    assert topk_agreement(base, same_set, 1) == 0.5


def test_classification_metrics_always_report_top5_and_kl():
    base = np.array([[2.0, 1.0, 0.0]] * 4)
    model = base.copy()
    model[0] = [1.0, 2.0, 0.0]
    m = classification_metrics(base, model, None)
    # sample 0: p = softmax([2,1,0]), q = softmax([1,2,0]); others identical
    p = np.exp([2.0, 1.0, 0.0]) / np.exp([2.0, 1.0, 0.0]).sum()
    q = np.exp([1.0, 2.0, 0.0]) / np.exp([1.0, 2.0, 0.0]).sum()
    assert m["kl_to_baseline"] == pytest.approx(float((p * np.log(p / q)).sum()) / 4)
    assert m["top5_agreement"] == 100.0 and m["agreement_with_baseline"] == 75.0 and m["samples"] == 4  # percent
    assert m["model"] == pytest.approx(100 * (3 * p[0] + p[1]) / 4)  # FP32 gives sample 0's new class p[1]


def test_an_unsure_fp32_model_makes_the_expected_drop_say_little_and_the_note_says_so():
    base = np.zeros((4, 10), np.float32)
    base[:, 0] = 0.1  # near-uniform: FP32 gives its top-1 about 11%
    model = np.roll(base, 1, axis=1)  # every sample flips
    m = classification_metrics(base, model, None)
    assert m["drop"] == pytest.approx(100 * (math.exp(0.1) - 1) / (math.exp(0.1) + 9), rel=1e-5)  # 1.04 points
    assert m["agreement_with_baseline"] == 0.0
    assert "FP32 is unsure of these samples (it gives its own top-1 10.9% on average)" in m["note"]
    assert "top-1 agreement (0.0%)" in m["note"]
    sure = classification_metrics(_logits([0, 1, 2, 1]), _logits([0, 1, 1, 1]), None)
    assert "unsure" not in sure["note"]
