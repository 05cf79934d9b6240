"""Issue 20 item 8: a FIFO, socket or device given to any path option is exit 2 in one line and
never blocks (regular files only, one shared rule: contracts/files.py and the CLI's InputPath)."""
import os
import signal
import socket

import pytest

from sqexport.contracts.errors import SqexportError
from sqexport.contracts.files import read_regular_bytes, require_regular


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "pipe"
    os.mkfifo(path)
    return path


@pytest.fixture(autouse=True)
def no_hang():
    """A read that blocks would hang the suite: SIGALRM turns it into a failure instead."""
    def fail(signum, frame):
        raise TimeoutError("blocked on a special file")
    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def _special(tmp_path, fifo, kind, suffix):
    if kind == "fifo":
        path = tmp_path / f"fifo{suffix}"
        os.mkfifo(path)
        return path
    if kind == "socket":
        path = tmp_path / f"s{suffix}"
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))
        return path
    link = tmp_path / f"zero{suffix}"  # a symlink to a character device: followed, then refused
    link.symlink_to("/dev/zero")
    return link


ARGS = {
    "recipe": lambda p, out: ["digits-mlp", "--recipe", p, "-o", out],
    "calib-data": lambda p, out: ["digits-mlp", "--calib-data", p, "-o", out],
    "eval-data": lambda p, out: ["digits-mlp", "--eval-data", p, "-o", out],
    "recover-data": lambda p, out: ["digits-mlp", "--recover", "--recover-data", p, "-o", out],
    "bench-zip": lambda p, out: ["bench", p, "--device", "local"],
    "perf-test": lambda p, out: ["bench", "model.ort", "--device", "local", "--perf-test", p],
    "check-model": lambda p, out: ["check", p],
    "check-baseline": lambda p, out: ["check", "model.onnx", "--baseline", p],
    "check-eval-data": lambda p, out: ["check", "model.onnx", "--eval-data", p],
    "inspect": lambda p, out: ["inspect", p],
    "model-file": lambda p, out: [p, "-o", out],
}
SUFFIX = {"recipe": ".yaml", "calib-data": ".npz", "eval-data": ".npz", "recover-data": ".npz", "bench-zip": ".zip",
          "check-model": ".onnx", "check-baseline": ".onnx", "check-eval-data": ".npz", "inspect": ".onnx",
          "model-file": ".pt", "perf-test": ""}


@pytest.mark.parametrize("kind", ["fifo", "socket", "device"])
@pytest.mark.parametrize("option", sorted(ARGS))
def test_special_files_are_exit_2_in_one_line(run_cli, tmp_path, monkeypatch, fifo, kind, option):
    monkeypatch.chdir(tmp_path)
    path = _special(tmp_path, fifo, kind, SUFFIX[option])
    result = run_cli(ARGS[option](path, tmp_path / "out"))
    assert result.exit_code == 2, result.output
    errors = [ln for ln in result.output.splitlines() if ln.startswith("Error")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert "regular files" in errors[0] or "no such file" in errors[0], errors[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("reader", ["recipe", "tensors", "texts", "onnx", "bundle"])
def test_library_readers_refuse_a_fifo_too(fifo, tmp_path, reader):
    """The Python API meets the same rule where it opens the file."""
    target = tmp_path / {"recipe": "r.yaml", "tensors": "d.npz", "texts": "t.txt", "onnx": "m.onnx",
                         "bundle": "b.zip"}[reader]
    os.rename(fifo, target)
    with pytest.raises(SqexportError, match="FIFO"):
        if reader == "recipe":
            from sqexport.toolchain.recipe import load_recipe
            load_recipe(target)
        elif reader == "tensors":
            from sqexport.models.tensor_data import load_tensor_batches
            load_tensor_batches(target, {"x": ((4,), "float32")})
        elif reader == "texts":
            from sqexport.models.text_data import read_texts
            read_texts(target)
        elif reader == "onnx":
            from sqexport.runtime_check.inspect_model import load_onnx
            load_onnx(target)
        else:
            from sqexport.toolchain.bundle_reader import read_bundle
            read_bundle(target, tmp_path)


def test_the_shared_helper(fifo, tmp_path):
    regular = tmp_path / "f"
    regular.write_bytes(b"12345")
    assert require_regular(regular, "x") == regular and read_regular_bytes(regular, "x") == b"12345"
    with pytest.raises(SqexportError, match="larger than 4"):
        read_regular_bytes(regular, "x", limit=4)
    link = tmp_path / "link"
    link.symlink_to(regular)
    with pytest.raises(SqexportError, match="symlink"):
        read_regular_bytes(link, "x", follow=False)
    for special, kind in ((fifo, "a FIFO"), ("/dev/zero", "a character device"), (tmp_path, "a folder")):
        with pytest.raises(SqexportError, match=f"is {kind}.*; sqexport reads regular files only"):
            read_regular_bytes(special, "x")
