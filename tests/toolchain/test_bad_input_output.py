"""The output folder through the CLI: a user's files are never deleted, impossible paths and a disk
that fills late are exit 2 with one line, and nothing is left behind."""
import errno
import os

import pytest

from sqexport.toolchain.output_folder import MANIFEST


def _one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, result.output
    return errors[0]


@pytest.mark.parametrize("case", ["report-json-only", "project-folder", "edited-output"])
def test_a_folder_with_the_users_files_is_never_replaced(run_cli, tmp_path, case):
    out = tmp_path / "out"
    out.mkdir()
    if case == "report-json-only":  # used to be taken for an earlier output and deleted whole
        files = {"report.json": "{}", "thesis.tex": "years of work"}
    elif case == "project-folder":
        files = {"train.py": "print()", "data.npy": "x"}
    else:  # an earlier output with a file the manifest does not list
        files = {MANIFEST: '{"tool": "sqexport", "files": []}', "report.md": "edited"}
    for name, text in files.items():
        (out / name).write_text(text)
    line = _one_error_line(run_cli(["export", "digits-mlp", "-o", out]))
    assert "sqexport did not write" in line
    assert {p.name: p.read_text() for p in out.iterdir()} == files
    assert sorted(os.listdir(tmp_path)) == ["out"]


@pytest.mark.parametrize("output", ["n" * 256, "/".join(["d" * 200] * 21), "loop"],
                         ids=["name-too-long", "path-too-long", "symlink-loop"])
def test_impossible_output_paths(run_cli, tmp_path, output):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    line = _one_error_line(run_cli(["export", "digits-mlp", "-o", tmp_path / output]))
    assert "output" in line
    assert os.listdir(tmp_path) == ["loop"]


@pytest.mark.e2e
def test_a_disk_that_fills_late(run_cli, tmp_path, monkeypatch):
    """ENOSPC while writing the report, after every slow stage: exit 2, no output, no temp folder."""
    import sqexport.toolchain.pipeline as pipeline

    def full(report, outdir):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pipeline, "write_report", full)
    line = _one_error_line(run_cli(["export", "digits-mlp", "--prune", "none", "--quant", "none",
                                    "--threads", "1", "-o", tmp_path / "out"]))
    assert "No space left on device" in line
    assert os.listdir(tmp_path) == []


@pytest.mark.e2e
def test_a_250_character_output_name_works(run_cli, tmp_path):
    out = tmp_path / ("n" * 250)
    result = run_cli(["export", "digits-mlp", "--prune", "none", "--quant", "none", "--threads", "1", "-o", out])
    assert result.exit_code == 0, result.output
    assert os.listdir(tmp_path) == [out.name] and (out / "model.onnx").is_file()
    again = run_cli(["export", "digits-mlp", "--prune", "none", "--quant", "none", "--threads", "1", "-o", out])
    assert again.exit_code == 0, again.output  # its own earlier output is replaced
    assert os.listdir(tmp_path) == [out.name]
