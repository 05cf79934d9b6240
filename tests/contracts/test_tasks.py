"""The task and target registries: one owner for what a task means, used by every layer."""
import math

import numpy as np
import pytest

from sqexport.contracts.errors import ConfigError
from sqexport.contracts.targets import get_target, target_names
from sqexport.contracts.tasks import first_output, get_task, hf_task_names, mean_pool, task_for_output, task_names, unit_of_metric
from sqexport.runtime_check.accuracy import drop_in_unit, task_metrics
from sqexport.runtime_check.gates import DEFAULT_DROP, Gates, accuracy_limit


def test_known_tasks_and_a_miss_that_lists_them():
    assert task_names() == ["feature-extraction", "image-classification", "sequence-classification"]
    assert hf_task_names() == ["feature-extraction", "sequence-classification"]
    with pytest.raises(ConfigError, match="feature-extraction"):
        get_task("object-detection")


@pytest.mark.parametrize("name, unit, limit, pool", [
    ("image-classification", "points", 1.0, first_output),
    ("sequence-classification", "points", 1.0, first_output),
    ("feature-extraction", "1-cosine", 0.01, mean_pool),
])
def test_each_task_owns_unit_gate_and_postprocessing(name, unit, limit, pool):
    task = get_task(name)
    assert (task.unit, task.default_max_drop, task.postprocess) == (unit, limit, pool)
    assert accuracy_limit(Gates(), name) == limit and accuracy_limit(Gates(max_accuracy_drop=3.0), name) == 3.0
    assert DEFAULT_DROP[unit] == limit
    assert task.argmax_fidelity == (unit == "points")


def test_metric_and_drop_follow_the_task():
    base = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    model = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # one of four flips
    cls = get_task("image-classification")
    m = task_metrics(cls, base, model, np.array([0, 1, 0, 1]))
    assert m["metric"] == "top1" and drop_in_unit(cls, m) == pytest.approx(25.0)
    m = task_metrics(cls, base, model)  # no labels: the flip costs FP32's e/(e+1) - 1/(e+1), over 4 samples
    assert m["metric"] == "top1_expected"
    assert drop_in_unit(cls, m) == pytest.approx(100 * (math.e - 1) / (math.e + 1) / 4)
    emb = get_task("feature-extraction")
    m = task_metrics(emb, base, model)
    assert m["metric"] == "cosine" and drop_in_unit(emb, m) == pytest.approx(0.25)  # cos 0 on one of four
    assert unit_of_metric("cosine") == "1-cosine" and unit_of_metric("top1_expected") == "points"
    assert unit_of_metric("top1_agreement") == "points"  # reports written before top1_expected
    assert unit_of_metric("none") is None


def test_a_bare_onnx_model_is_compared_by_its_output():
    assert task_for_output("logits").output == "logits"
    assert task_for_output("embeddings").name == "feature-extraction"


def test_targets():
    assert "cpu" in target_names() and get_target("cpu").summary
    with pytest.raises(ConfigError, match="cpu"):
        get_target("gpu")
