"""docs/python-api.md: every ```python block runs as written, in an empty folder, in page order."""
from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

PAGE = Path(__file__).resolve().parents[2] / "docs" / "python-api.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```$", PAGE.read_text(encoding="utf-8"), flags=re.S | re.M)


def _title(code: str) -> str:
    """The heading above a block, for the test id."""
    text = PAGE.read_text(encoding="utf-8")
    heading = re.findall(r"^## (.+)$", text[:text.index(code)], flags=re.M)
    return re.sub(r"\W+", "-", heading[-1].lower()).strip("-") if heading else "intro"


def test_the_page_shows_each_documented_use():
    calls = "\n".join(BLOCKS)
    assert len(BLOCKS) >= 4
    for use in ("sqexport.export(\"digits-mlp\"", "sqexport.export(net,", "except sqexport.GateFailed",
                "sqexport.check(", "sqexport.package("):
        assert use in calls, use


@pytest.mark.parametrize("code", BLOCKS, ids=[_title(b) for b in BLOCKS])
def test_example_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, f"{PAGE.name} example", "exec"), {"__name__": "__main__"})
    assert printed.getvalue().strip(), "an example shows its result"
