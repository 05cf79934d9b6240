"""Task metrics against hand-computed values."""
import math

import numpy as np
import pytest

from runtime_check.accuracy import classification_metrics, embedding_metrics, run_session, spearman


def _logits(preds, n_classes=3):
    return np.eye(n_classes, dtype=np.float32)[preds]


def test_classification_with_labels():
    m = classification_metrics(_logits([0, 1, 2, 1]), _logits([0, 1, 1, 1]), np.array([0, 1, 2, 2]))
    assert m["metric"] == "top1" and m["unit"] == "%" and m["drop_unit"] == "points"
    assert m["baseline"] == 75.0 and m["model"] == 50.0
    assert m["drop"] == pytest.approx(25.0) and "drop_points" not in m  # one unit per metric
    assert m["agreement_with_baseline"] == 75.0


def test_classification_without_labels_is_agreement():
    m = classification_metrics(_logits([0, 1, 2, 1]), _logits([0, 1, 1, 1]), None)
    assert m["metric"] == "top1_agreement" and (m["unit"], m["drop_unit"]) == ("%", "points")
    assert m["baseline"] == 100.0 and m["model"] == 75.0
    assert m["drop"] == pytest.approx(25.0)


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
