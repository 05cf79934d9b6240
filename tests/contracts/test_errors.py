"""first_line: the one helper every "first line of an exception" message goes through."""
import pytest

from sqexport.contracts.errors import first_line


@pytest.mark.parametrize("exc, expected", [
    (ValueError("bad\nmore detail"), "bad"), (ValueError(""), "ValueError"), (KeyError(), "KeyError"),
    (RuntimeError("\n\n  late line\n"), "late line"), (OSError(), "OSError"),
])
def test_first_line_never_fails(exc, expected):
    assert first_line(exc) == expected
