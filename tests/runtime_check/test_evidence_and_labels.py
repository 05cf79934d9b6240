"""What the gate rests on (how far one changed prediction moves a top-1 metric, how many images), and
the class names `check` reads from a model's metadata."""
import pytest

from sqexport.runtime_check.verify import sample_evidence


def test_few_samples_say_the_step_one_prediction_makes():
    ev = sample_evidence({"samples": 8, "drop_unit": "points"})
    assert ev["one_sample_points"] == pytest.approx(12.5)
    assert ev["evidence"].startswith("8 evaluation sample(s): one changed prediction moves the metric by 12.5 points")
    assert "coarse estimate" in ev["evidence"]


def test_views_count_images_not_samples():
    ev = sample_evidence({"samples": 160, "drop_unit": "points"}, views=8)  # 20 images x 8 views
    assert ev["one_sample_points"] == pytest.approx(0.625)
    assert ev["evidence"].startswith("160 evaluation samples (20 image(s) x 8 views")
    assert "fewer than 100 images give a coarse estimate" in ev["evidence"]


def test_many_samples_and_non_point_metrics():
    assert "coarse" not in sample_evidence({"samples": 400, "drop_unit": "points"})["evidence"]
    assert sample_evidence({"samples": 8, "drop_unit": "1-cosine"}) == {}


@pytest.mark.parametrize("metadata, names", [
    ({"sqexport.labels": '["neg", "pos"]'}, ["neg", "pos"]),
    ({"sqexport.preprocessing": '{"labels": ["cat", "dog"]}'}, ["cat", "dog"]),  # a mobile model's entry
    ({"sqexport.labels": "not json"}, None),
    ({"sqexport.labels": '{"a": 1}'}, None),
    ({"sqexport.labels": '[1, 2]'}, None),
    ({"sqexport.labels": "[]"}, None),
    ({"sqexport.preprocessing": '["cat"]'}, None),
    ({"sqexport.labels": "[" * 100000 + "]" * 100000}, None),  # nested too deep: not a crash
    ({}, None),
])
def test_class_names_come_only_from_a_list_of_strings_in_the_models_metadata(metadata, names):
    from sqexport.runtime_check.check import _label_names

    assert _label_names(metadata) == names
