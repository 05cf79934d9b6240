"""Issue 20, `sqexport bench` (items 2, 4, 5, 9, 10, 13): a bundle never runs its own code, its
manifest and the runner's output are untrusted input (exit 2, one line), hostile file names never
reach a shell, the report beside the zip is updated only when sqexport provably wrote it, and no
process or temporary folder is left behind."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from child_process import alive, signals_as_from_a_terminal
from sqexport.toolchain.manifest import owned
from sqexport.toolchain.output_folder import check_output

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def out(mobile_export, tmp_path, monkeypatch):
    """A copy of the mobile output folder; temporary folders go to tmp_path/tmp (checked empty)."""
    folder = tmp_path / "out"
    shutil.copytree(mobile_export.out, folder)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    return folder


def _one_line_exit_2(result):
    assert result.exit_code == 2, result.output
    errors = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(errors) == 1 and errors[0].startswith("Error: ") and "Traceback" not in result.output, result.output
    return errors[0]


def _no_temp_left(out):
    assert os.listdir(out.parent / "tmp") == []


def _rewrite(zip_path, dest, replace=None, drop=(), manifest_edit=None, rehash=True):
    """A copy of the bundle with members replaced/dropped; the manifest re-hashed to match (a
    consistent, hostile bundle) unless rehash=False, then edited by `manifest_edit`."""
    replace = replace or {}
    with zipfile.ZipFile(zip_path) as zf:
        members = {n: zf.read(n) for n in zf.namelist() if n not in drop}
    members.update(replace)
    manifest = json.loads(members.get("manifest.json", b'{"files": {}}'))
    if rehash:
        for name, data in members.items():
            if name != "manifest.json":
                manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    if manifest_edit is not None:
        manifest = manifest_edit(manifest)
    if "manifest.json" in members:
        members["manifest.json"] = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return dest


def _bench(run_cli, target, *args):
    return run_cli(["bench", target, "--iters", "2", "--threads", "1", *args])


def test_the_bundles_own_runner_never_runs(run_cli, out, tmp_path):
    marker = tmp_path / "ran"
    evil = f"open({str(marker)!r}, 'w').write('bundle code ran')\n".encode()
    hostile = _rewrite(out / "digits-cnn-mobile.zip", out / "hostile-mobile.zip", replace={"run_model.py": evil})
    result = _bench(run_cli, hostile, "--device", "local", "--json")
    assert result.exit_code == 0, result.output
    assert not marker.exists() and json.loads(result.output)["runner"] == 1
    _no_temp_left(out)


@pytest.mark.parametrize("case, needle", [
    ("no-manifest", "no manifest.json"), ("not-json", "not valid JSON"), ("a-list", "'files' object"),
    ("files-list", "'files' object"), ("no-sha", "no sha256 for model.ort"), ("sha-int", "no sha256 for model.ort"),
    ("tampered-model", "does not match its sha256"), ("tampered-reference", "reference.npz does not match"),
    ("no-model", "no model.ort"), ("not-a-zip", "not a readable zip"),
])
def test_bad_bundles_are_exit_2_in_one_line(run_cli, out, case, needle):
    src, bad = out / "digits-cnn-mobile.zip", out / "bad-mobile.zip"
    edits = {"not-json": lambda m: b"{not json", "a-list": lambda m: b"[1, 2]",
             "files-list": lambda m: {**m, "files": []},
             "no-sha": lambda m: {**m, "files": {**m["files"], "model.ort": {"bytes": 1}}},
             "sha-int": lambda m: {**m, "files": {**m["files"], "model.ort": {"sha256": 5}}}}
    if case == "no-manifest":
        _rewrite(src, bad, drop=("manifest.json",))
    elif case in edits:
        _rewrite(src, bad, manifest_edit=edits[case])
    elif case.startswith("tampered"):
        name = "model.ort" if case == "tampered-model" else "reference.npz"
        with zipfile.ZipFile(src) as zf:
            data = bytearray(zf.read(name))
        data[len(data) // 2] ^= 0xFF
        _rewrite(src, bad, replace={name: bytes(data)}, rehash=False)
    elif case == "no-model":
        _rewrite(src, bad, drop=("model.ort",))
    else:
        bad.write_bytes(b"PK\x03\x04 truncated")
    line = _one_line_exit_2(_bench(run_cli, bad, "--device", "local"))
    assert needle in line
    _no_temp_left(out)


@pytest.mark.parametrize("case", ["ratio", "members", "total"])
def test_zip_bombs_are_refused_before_inflating(run_cli, out, monkeypatch, case):
    bomb = out / "bomb-mobile.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        if case == "ratio":  # 64 MB of zeros in ~64 KB
            zf.writestr("model.ort", b"\0" * (64 << 20))
        elif case == "members":
            for i in range(300):
                zf.writestr(f"f{i}", b"")
        else:
            monkeypatch.setattr("sqexport.toolchain.bundle_reader.MAX_TOTAL_BYTES", 1000)
            zf.writestr("model.ort", os.urandom(2000))
    line = _one_line_exit_2(_bench(run_cli, bomb, "--device", "local"))
    assert "zip bomb" in line
    assert sorted(os.listdir(out.parent / "tmp")) == []


@pytest.mark.parametrize("target", ["model.ort", "model.onnx", "."])
def test_bench_a_model_file_or_an_output_folder(run_cli, out, target):
    """Issue item 13: the runner was pushed as device_runner.py and run as run_model.py."""
    result = _bench(run_cli, out / target, "--device", "local", "--json")
    assert result.exit_code == 0, result.output
    res = json.loads(result.output)
    assert res["same_model"] and set(res["latency_ms"]) == {"1"}
    _no_temp_left(out)


HOSTILE = ["m;touch${IFS}pwned;.ort", "$(touch pwned).ort", "`touch pwned`.ort", "m\ntouch pwned\n.ort",
           "-rf .ort", "m' ; touch pwned ; '.ort"]


@pytest.mark.parametrize("device", ["ssh://me@phone", "adb:emulator-5554", "local"])
def test_hostile_file_names_never_reach_a_shell(run_cli, out, fake_tools, monkeypatch, device):
    monkeypatch.chdir(fake_tools)
    for name in HOSTILE:
        hostile = fake_tools / name
        shutil.copyfile(out / "model.ort", hostile)
        result = _bench(run_cli, hostile, "--device", device, "--device-python", sys.executable, "--json")
        assert result.exit_code == 0, (name, result.output)
        assert json.loads(result.output)["same_model"]
    found = [p for root in (fake_tools, out.parent) for p in root.rglob("pwned*")]
    assert found == [] and not any((fake_tools / "device").iterdir())


@pytest.mark.parametrize("python", ["python3;touch pwned", "$(touch pwned)", "`touch pwned`"])
def test_hostile_option_values_stay_words_on_the_device(run_cli, out, fake_tools, monkeypatch, python):
    monkeypatch.chdir(fake_tools)
    result = _bench(run_cli, out / "digits-cnn-mobile.zip", "--device", "ssh://me@phone", "--device-python", python)
    _one_line_exit_2(result)
    assert list(fake_tools.rglob("pwned*")) == []


@pytest.mark.parametrize("template", ["{model.nope}", "{iters:>999999999}", "{0}", "{model[0]}", "{model!r}",
                                      "{python} {runner", "{nope}", "{__class__}"])
def test_bad_device_command_templates_are_exit_2_before_any_push(run_cli, out, template):
    line = _one_line_exit_2(_bench(run_cli, out / "digits-cnn-mobile.zip", "--device", "local",
                                   "--device-cmd", template))
    assert "template" in line and len(line) < 400
    _no_temp_left(out)


RESULTS = {
    "p50-string": {"latency_ms": {"1": {"p50": "fast", "p90": 1}}},
    "latency-list": {"latency_ms": [1, 2]},
    "nan": {"latency_ms": {"1": {"p50": float("nan"), "p90": 1}}},
    "negative": {"latency_ms": {"1": {"p50": -1, "p90": 1}}},
    "bad-threads": {"latency_ms": {"x; rm": {"p50": 1, "p90": 1}}},
    "sha-list": {"model_sha256": ["a"]},
    "reference-string": {"reference": {"max_abs_diff": "0", "reference_max_abs": 1}},
    "not-object": [1, 2, 3],
    "saturates-string": {"int8_saturates": "yes"},
    "cpu-dict": {"cpu": {"a": 1}},
}


@pytest.mark.parametrize("case", sorted(RESULTS))
def test_runner_output_with_wrong_types_is_exit_2(run_cli, out, tmp_path, case):
    good = {"model_sha256": hashlib.sha256((out / "model.ort").read_bytes()).hexdigest(),
            "latency_ms": {"1": {"p50": 1.0, "p90": 1.0}}}
    data = RESULTS[case] if isinstance(RESULTS[case], list) else {**good, **RESULTS[case]}
    fake = tmp_path / "fake_runner.py"
    fake.write_text(f"print({json.dumps(data)!r})\n")
    line = _one_line_exit_2(_bench(run_cli, out / "digits-cnn-mobile.zip", "--device", "local",
                                   "--device-cmd", f"{{python}} {fake}"))
    assert "malformed" in line or "no result line" in line


def test_runner_output_nested_deep_or_escape_codes(run_cli, out, tmp_path):
    fake = tmp_path / "deep.py"
    fake.write_text("print('{\"a\": ' + '[' * 100000 + ']' * 100000 + '}')\n")
    _one_line_exit_2(_bench(run_cli, out / "digits-cnn-mobile.zip", "--device", "local", "--device-cmd",
                            f"{{python}} {fake}"))
    sha = hashlib.sha256((out / "model.ort").read_bytes()).hexdigest()
    fake.write_text("import json\nprint(json.dumps({'model_sha256': %r, 'cpu': '\\x1b[2J\\x1b]0;x\\x07evil', "
                    "'latency_ms': {'1': {'p50': 1.0, 'p90': 1.0}}}))\n" % sha)
    result = _bench(run_cli, out / "digits-cnn-mobile.zip", "--device", "local", "--device-cmd", f"{{python}} {fake}")
    assert result.exit_code == 0 and "\x1b" not in result.output, result.output


def test_a_report_the_user_edited_is_left_alone(run_cli, out):
    (out / "report.json").write_text('{"model": "edited by me"}')
    md = (out / "report.md").read_bytes()
    result = _bench(run_cli, out / "digits-cnn-mobile.zip", "--device", "local")
    assert result.exit_code == 0, result.output
    assert "left as it is" in result.output and "p50" in result.output
    assert (out / "report.json").read_text() == '{"model": "edited by me"}' and (out / "report.md").read_bytes() == md


def test_an_owned_report_that_breaks_the_schema_is_left_alone(run_cli, out):
    """A report sqexport's manifest vouches for is still data: it is updated only if it follows the
    schema (here a newer tool's or a hand-made one without `accuracy`)."""
    from sqexport.toolchain.manifest import record

    rep = json.loads((out / "report.json").read_text())
    del rep["accuracy"]
    (out / "report.json").write_text(json.dumps(rep))
    record(out, ["report.json"])
    before = (out / "report.json").read_bytes()
    result = _bench(run_cli, out / "digits-cnn-mobile.zip", "--device", "local")
    assert result.exit_code == 0, result.output
    assert "does not follow report.json's schema ((top): 'accuracy' is a required property)" in result.output
    assert (out / "report.json").read_bytes() == before


@pytest.mark.parametrize("content", [b"\xff\xfe not json", b"[1, 2]", b"{broken"])
def test_a_non_json_report_beside_the_zip_keeps_the_device_result(run_cli, out, content):
    (out / "report.json").write_bytes(content)
    result = _bench(run_cli, out / "digits-cnn-mobile.zip", "--device", "local", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["report"] is None and (out / "report.json").read_bytes() == content


def test_our_report_is_updated_and_the_manifest_follows(run_cli, out):
    result = _bench(run_cli, out / "digits-cnn-mobile.zip", "--device", "local")
    assert result.exit_code == 0, result.output
    assert "device_latency" in json.loads((out / "report.json").read_text())
    assert owned(out, "report.json") and owned(out, "report.md")
    check_output(out)  # the next export may still replace the folder


@pytest.mark.parametrize("device", ["ssh://me@unreachable", "adb:offline"])
def test_a_failed_push_leaves_no_temporary_folder(run_cli, out, fake_tools, device):
    _one_line_exit_2(_bench(run_cli, out / "digits-cnn-mobile.zip", "--device", device,
                            "--device-python", sys.executable))
    _no_temp_left(out)


def test_local_push_failure_removes_the_device_folder(run_cli, out, monkeypatch):
    def fail(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr("sqexport.runtime_check.device.shutil", SimpleNamespace(copyfile=fail, rmtree=shutil.rmtree))
    line = _one_line_exit_2(_bench(run_cli, out / "digits-cnn-mobile.zip", "--device", "local"))
    assert "push failed" in line
    _no_temp_left(out)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_kills_the_runner_and_removes_temporary_folders(out, tmp_path, sig):
    pid_file = tmp_path / "runner.pid"
    sleeper = tmp_path / "sleeper.py"
    sleeper.write_text(f"import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\ntime.sleep(120)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path / "tmp")}
    proc = subprocess.Popen([sys.executable, "-m", "sqexport", "bench", str(out / "digits-cnn-mobile.zip"),
                             "--device", "local", "--device-cmd", f"{{python}} {sleeper}"],
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=signals_as_from_a_terminal)
    try:
        deadline = time.monotonic() + 120
        while not (pid_file.is_file() and pid_file.read_text()):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"the runner never started (exit {proc.poll()}): {proc.communicate(timeout=30)[1]}")
            time.sleep(0.05)
        runner = int(pid_file.read_text())
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == 128 + sig, stderr
    assert len([ln for ln in stderr.splitlines() if ln.strip()]) == 1 and "interrupted" in stderr
    deadline = time.monotonic() + 10
    while alive(runner) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(runner), "the runner outlived sqexport"
    # only sqexport's own temporary folders count (onnxruntime keeps a telemetry file `.ses` there)
    assert [p for p in os.listdir(tmp_path / "tmp") if "sqexport" in p] == []
