"""atomic_output: the output folder appears complete or not at all."""
import os
import stat

import pytest

from contracts.errors import OutputError
from toolchain.pipeline import atomic_output


def test_success_moves_the_folder_into_place(tmp_path):
    out = tmp_path / "out"
    with atomic_output(out) as tmp:
        assert tmp.parent == out.parent and tmp != out
        (tmp / "a.txt").write_text("x")
        assert not out.exists()
    assert (out / "a.txt").read_text() == "x"
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_success_replaces_a_previous_output_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("{}")
    (out / "model.onnx").write_text("old")
    with atomic_output(out) as tmp:
        (tmp / "report.json").write_text('{"new": 1}')
    assert sorted(os.listdir(out)) == ["report.json"]
    assert (out / "report.json").read_text() == '{"new": 1}'
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_error_leaves_nothing_behind_and_keeps_the_old_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("{}")  # an earlier sqexport output
    with pytest.raises(RuntimeError):
        with atomic_output(out) as tmp:
            (tmp / "half.onnx").write_text("partial")
            raise RuntimeError("boom")
    assert sorted(os.listdir(tmp_path)) == ["out"]
    assert sorted(os.listdir(out)) == ["report.json"]


def test_output_under_a_regular_file_is_an_output_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError):
        with atomic_output(tmp_path / "file" / "out"):
            pass
    assert (tmp_path / "file").read_text() == "x"


def test_output_folder_gets_normal_permissions(tmp_path):
    """Like `mkdir`: the finished folder follows the umask (not mkdtemp's private 0700)."""
    old = os.umask(0o022)
    try:
        with atomic_output(tmp_path / "out"):
            pass
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
