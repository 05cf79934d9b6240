"""report.json follows the JSON Schema that ships with sqexport (other tools read the report)."""
import copy
import json

import pytest

from sqexport.runtime_check.report import write_report
from sqexport.runtime_check.report_schema import SCHEMA_PATH, SCHEMA_VERSION, report_schema, schema_errors
from sqexport.toolchain.pipeline import with_method_sections


def test_the_schema_is_a_valid_draft_2020_12_schema():
    from jsonschema import Draft202012Validator

    Draft202012Validator.check_schema(report_schema())
    assert SCHEMA_PATH.name == "report.schema.json"


def test_a_real_report_validates_and_carries_its_version(default_export):
    rep = default_export.report
    assert rep["schema_version"] == SCHEMA_VERSION == "1.1"
    assert schema_errors(rep) == []


@pytest.mark.parametrize("edit, where", [
    (lambda r: r.pop("accuracy"), "(top): 'accuracy' is a required property"),
    (lambda r: r.__setitem__("acuracy", {}), "(top): Additional properties are not allowed ('acuracy' was unexpected)"),
    (lambda r: r["accuracy"].__setitem__("drop", "0.2"), "accuracy/drop: '0.2' is not of type 'number', 'null'"),
    (lambda r: r["checks"][0].__setitem__("passed", "yes"), "checks/0/passed: 'yes' is not of type 'boolean'"),
    (lambda r: r["latency_ms"]["model"].pop("p50"), "latency_ms/model: 'p50' is a required property"),
    (lambda r: r.__setitem__("schema_version", "2.0"), "schema_version: '2.0' does not match"),
    (lambda r: r["plots"].__setitem__("x", "../../etc/passwd.png"), "plots/x: '../../etc/passwd.png' does not match"),
])
def test_a_report_that_breaks_the_contract_is_named(default_export, edit, where):
    rep = copy.deepcopy(default_export.report)
    edit(rep)
    errors = schema_errors(rep)
    assert len(errors) == 1 and errors[0].startswith(where), errors


def test_writing_a_deviating_report_fails_under_strict_mode_and_is_noted_otherwise(default_export, tmp_path,
                                                                                  monkeypatch):
    rep = copy.deepcopy(default_export.report)
    rep["new_section"] = {"undeclared": True}
    monkeypatch.setenv("SQEXPORT_STRICT_REPORT", "1")
    with pytest.raises(AssertionError, match="'new_section' was unexpected"):
        write_report(copy.deepcopy(rep), tmp_path)
    assert not (tmp_path / "report.json").exists()
    monkeypatch.setenv("SQEXPORT_STRICT_REPORT", "0")
    write_report(rep, tmp_path)
    written = json.loads((tmp_path / "report.json").read_text())
    assert written["notes"][-1].startswith("report.json deviates from its schema (1.1): (top): Additional properties")


def test_a_method_section_never_replaces_a_core_one():
    core = {"accuracy": {"drop": 0.1}, "model": "m"}
    assert with_method_sections(core, {"pqi": {"trace": []}}) == {**core, "pqi": {"trace": []}}
    with pytest.raises(RuntimeError, match="report sections set twice .*: accuracy"):
        with_method_sections(core, {"accuracy": {"drop": 0.0}})


def test_a_model_slower_than_fp32_is_said_so():
    from sqexport.runtime_check.gates import slower_note

    fast = {"threads": 2, "speedup": 1.7, "at_1_thread": {"threads": 1, "speedup": 3.4}}
    assert slower_note(fast) is None
    slow = {"threads": 2, "speedup": 0.8, "at_1_thread": {"threads": 1, "speedup": 1.1}}
    note = slower_note(slow)
    assert note.startswith("model.onnx is SLOWER than baseline.onnx on this CPU (0.80x at 2 thread(s))")
    assert "1.10x" not in note
