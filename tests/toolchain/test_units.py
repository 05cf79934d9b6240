"""One unit per metric: the console, report.md and report.json print the same numbers in the same
units (contracts/units.py). The embedding-model half is in test_cli_hf.py (its tiny-BERT run)."""
import pytest

from sqexport.contracts.units import format_value, metric_units


def test_units_per_metric():
    assert metric_units("top1") == ("%", "points")
    assert metric_units("top1_agreement") == ("%", "points")
    assert metric_units("cosine") == ("cosine", "1-cosine")


@pytest.mark.parametrize("value, unit, text", [
    (0.2222, "points", "0.22 points"), (99.5556, "%", "99.56 %"), (0.99204, "cosine", "0.9920 cosine"),
    (0.00796, "1-cosine", "0.0080 1-cosine"), (0.0751, "ms", "0.075 ms"), (1.139, "x", "1.14x"), (None, "ms", "n/a"),
])
def test_format_value(value, unit, text):
    assert format_value(value, unit) == text


def test_digits_cnn_units_agree(default_export, units_agree):
    assert default_export.result.exit_code == 0, default_export.result.output
    units_agree(default_export.result.stdout, default_export.out)
    acc = default_export.report["accuracy"]
    assert (acc["unit"], acc["drop_unit"]) == ("%", "points")
    # digits eval split: 450 images, so top-1 moves in steps of 100/450 %
    assert acc["baseline"] * 4.5 == pytest.approx(round(acc["baseline"] * 4.5))



def test_drop_units_agree_with_the_task_registry():
    from sqexport.contracts.tasks import get_task, task_names

    for name in task_names():
        task = get_task(name)
        assert metric_units(task.metric)[1] == task.unit
        if task.output == "logits":
            assert metric_units(f"{task.metric}_agreement")[1] == task.unit
