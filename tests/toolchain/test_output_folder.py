"""atomic_output: the output folder appears complete or not at all, and replacing an earlier
output deletes only the files sqexport wrote (listed in its manifest)."""
import errno
import json
import os
import stat
import subprocess
import sys

import pytest

from sqexport.contracts.errors import OutputError
from sqexport.toolchain.output_folder import MANIFEST, TMP_MARKER, atomic_output, remove_stale_temps


def _write(out, files):
    with atomic_output(out) as tmp:
        for name, text in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(text)


def test_success_moves_the_folder_into_place_with_a_manifest(tmp_path):
    out = tmp_path / "out"
    with atomic_output(out) as tmp:
        assert tmp.parent == out.parent and tmp != out
        (tmp / "a.txt").write_text("x")
        assert not out.exists()
    assert (out / "a.txt").read_text() == "x"
    assert sorted(os.listdir(tmp_path)) == ["out"]
    assert sorted(os.listdir(out)) == [MANIFEST, "a.txt"]
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["files"] == [{"path": "a.txt", "size": 1, "sha256":
                                  "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881"}]


def test_success_replaces_a_previous_sqexport_output(tmp_path):
    out = tmp_path / "out"
    _write(out, {"report.json": "{}", "model.onnx": "old", "sub/vocab.txt": "a"})
    _write(out, {"report.json": '{"new": 1}'})
    assert sorted(os.listdir(out)) == [MANIFEST, "report.json"]
    assert (out / "report.json").read_text() == '{"new": 1}'
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_an_empty_folder_is_replaced(tmp_path):
    (tmp_path / "out").mkdir()
    _write(tmp_path / "out", {"a": "1"})
    assert sorted(os.listdir(tmp_path / "out")) == [MANIFEST, "a"]


@pytest.mark.parametrize("case", ["foreign-file", "no-manifest", "changed-file", "foreign-in-subfolder",
                                  "symlink", "corrupt-manifest"])
def test_anything_sqexport_did_not_write_is_never_deleted(tmp_path, case):
    out = tmp_path / "out"
    _write(out, {"report.json": "{}", "sub/x.txt": "x"})
    if case == "foreign-file":
        (out / "notes.txt").write_text("mine")
    elif case == "no-manifest":  # e.g. a folder that merely holds a report.json
        (out / MANIFEST).unlink()
    elif case == "changed-file":
        (out / "report.json").write_text('{"edited": 1}')
    elif case == "foreign-in-subfolder":
        (out / "sub" / "mine.txt").write_text("mine")
    elif case == "symlink":
        (out / "link").symlink_to(tmp_path)
    else:
        (out / MANIFEST).write_text("not json")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and not p.is_symlink()}
    with pytest.raises(OutputError, match="choose another -o"):
        _write(out, {"report.json": "new"})
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and not p.is_symlink()} == before
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_a_file_added_during_the_run_is_kept(tmp_path):
    out = tmp_path / "out"
    _write(out, {"report.json": "{}"})
    with pytest.raises(OutputError, match="late.txt"):
        with atomic_output(out) as tmp:
            (tmp / "report.json").write_text("new")
            (out / "late.txt").write_text("mine")
    assert (out / "late.txt").read_text() == "mine" and (out / "report.json").read_text() == "{}"
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_error_leaves_nothing_behind_and_keeps_the_old_folder(tmp_path):
    out = tmp_path / "out"
    _write(out, {"report.json": "{}"})
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_output(out) as tmp:
            (tmp / "half.onnx").write_text("partial")
            raise RuntimeError("boom")
    assert sorted(os.listdir(tmp_path)) == ["out"]
    assert sorted(os.listdir(out)) == [MANIFEST, "report.json"]


@pytest.mark.parametrize("wrap", [False, True], ids=["raw", "wrapped"])
def test_a_full_disk_is_an_output_error(tmp_path, wrap):
    """ENOSPC however it surfaces (raw, or wrapped by an exporter) -> OutputError, temp removed."""
    from sqexport.contracts.errors import ExportError

    with pytest.raises(OutputError, match="No space left on device"):
        with atomic_output(tmp_path / "out") as tmp:
            try:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp / "model.onnx"))
            except OSError as exc:
                if not wrap:
                    raise
                raise ExportError("torch.onnx export failed: OSError") from exc
    assert os.listdir(tmp_path) == []


def test_output_under_a_regular_file_is_an_output_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="file is a file, not a folder"):
        with atomic_output(tmp_path / "file" / "out"):
            pass
    assert (tmp_path / "file").read_text() == "x"


def test_a_symlinked_output_writes_where_it_points(tmp_path):
    """The link stays a link; no `.link.old-*` is left beside it."""
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    for text in ("first", "second"):
        _write(tmp_path / "link", {"a": text})
    assert (tmp_path / "link").is_symlink() and (tmp_path / "real" / "a").read_text() == "second"
    assert sorted(os.listdir(tmp_path)) == ["link", "real"]


def test_a_long_output_name_gets_a_short_temporary_name(tmp_path):
    name = "n" * 250
    with atomic_output(tmp_path / name) as tmp:
        assert len(tmp.name) <= 255
    assert os.listdir(tmp_path) == [name]


@pytest.mark.parametrize("path, words", [("n" * 256, "cannot use output folder"),
                                         ("/".join(["d" * 200] * 21), "cannot use output folder"),
                                         ("bad\0name", "contains a NUL character")],
                         ids=["name-max", "path-max", "nul"])
def test_impossible_output_paths_are_output_errors(tmp_path, path, words):
    with pytest.raises(OutputError, match=words):
        with atomic_output(tmp_path / path):
            pass
    assert os.listdir(tmp_path) == []


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          timeout=60)
    return int(proc.stdout)


def test_stale_temp_folders_of_killed_runs_are_removed_and_nothing_else(tmp_path):
    def make(name, pid=None, host=None):
        (tmp_path / name).mkdir()
        (tmp_path / name / "baseline.onnx").write_text("x")
        if pid is not None:
            (tmp_path / name / TMP_MARKER).write_text(json.dumps({"pid": pid, "host": host or os.uname().nodename}))

    make(".out.tmp-dead", _dead_pid())
    make(".other.tmp-alive", os.getppid())  # a live process: maybe a run in progress
    make(".out.tmp-nomarker")  # not provably ours
    make(".out.tmp-elsewhere", _dead_pid(), host="another-host")  # a shared folder: pid means nothing
    (tmp_path / "notes.tmp-x").mkdir()
    removed = remove_stale_temps(tmp_path)
    assert [p.name for p in removed] == [".out.tmp-dead"]
    assert sorted(os.listdir(tmp_path)) == [".other.tmp-alive", ".out.tmp-elsewhere", ".out.tmp-nomarker",
                                            "notes.tmp-x"]


def test_output_folder_gets_normal_permissions(tmp_path):
    """Like `mkdir`: the finished folder follows the umask (not mkdtemp's private 0700)."""
    old = os.umask(0o022)
    try:
        with atomic_output(tmp_path / "out"):
            pass
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
