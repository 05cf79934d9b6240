"""report.json's contract: its JSON Schema (shipped beside this module) and the version it carries.

Other tools read report.json, so its shape is checked, not just documented: every report the test
suite makes is validated where it is written (SQEXPORT_STRICT_REPORT=1 turns a deviation into an
error), and a report read back from a folder (`sqexport bench`) is trusted only if it validates.
"""
from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

__all__ = ["SCHEMA_VERSION", "SCHEMA_PATH", "report_schema", "schema_errors", "strict_reports"]

# MAJOR.MINOR: MINOR grows when a section or field is added, MAJOR when one changes or goes away
SCHEMA_VERSION = "1.1"
SCHEMA_PATH = Path(__file__).with_name("report.schema.json")
MAX_ERRORS = 5


@lru_cache(maxsize=1)
def report_schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


@lru_cache(maxsize=1)
def _validator():
    from jsonschema import Draft202012Validator

    return Draft202012Validator(report_schema())


def schema_errors(report) -> list[str]:
    """Up to MAX_ERRORS deviations from the schema as 'path: message' lines (empty: valid)."""
    errors = sorted(_validator().iter_errors(report), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message[:200]}" for e in errors[:MAX_ERRORS]]


def strict_reports() -> bool:
    """Whether a report that deviates from the schema is an error (the test suite sets it)."""
    return os.environ.get("SQEXPORT_STRICT_REPORT", "") == "1"
