"""Issue 20 items 4 and 10, `sqexport package`: report.json is data (its `model` only ever becomes a
plain file name; wrong types are exit 2), symlinked tokenizer files are refused, never followed,
and `-o FILE` replaces only a zip sqexport's manifest proves it wrote."""
import json
import os
import shutil
import zipfile

import pytest

from sqexport.toolchain.manifest import owned
from sqexport.toolchain.output_folder import check_output


@pytest.fixture
def out(mobile_export, tmp_path):
    folder = tmp_path / "work" / "out"
    shutil.copytree(mobile_export.out, folder)
    return folder


def _edit_report(out, **changes):
    report = json.loads((out / "report.json").read_text())
    report.update(changes)
    (out / "report.json").write_text(json.dumps(report))


def _exit_2(result):
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in result.output
    return lines[0]


def _tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("name", ["../../escaped", "/tmp/abs", "..", "a/b", "../", "\n", ""])
def test_the_zip_name_from_the_report_stays_in_the_folder(run_cli, out, tmp_path, name):
    _edit_report(out, model=name)
    before = _tree(tmp_path)
    result = run_cli(["package", out, "--target", "mobile"])
    if name.strip():
        assert result.exit_code == 0, result.output
        made = sorted(set(_tree(tmp_path)) - set(before))
        assert len(made) == 1 and made[0].startswith("work/out/") and made[0].endswith("-mobile.zip"), made
        assert owned(out, made[0].split("/")[-1])
    else:
        _exit_2(result)
        assert _tree(tmp_path) == before
    assert not (tmp_path / "escaped-mobile.zip").exists() and not os.path.exists("/tmp/abs-mobile.zip")


@pytest.mark.parametrize("report, needle", [
    ({"target": "mobile", "mobile": {}}, "names no model"),
    ([1, 2], "JSON object"),
    ("mobile-5", "'mobile' must be"),
    ("model-5", "names no model"),
    ("not json", "no readable report.json"),
    ("versions-5", "does not follow report.json's schema: mobile/ort: 7 is not of type 'object'"),
])
def test_reports_of_the_wrong_shape_are_exit_2(run_cli, out, report, needle):
    data = json.loads((out / "report.json").read_text())
    named = {"mobile-5": json.dumps({**data, "mobile": 5}), "model-5": json.dumps({**data, "model": 5}),
             "not json": "{oops",
             "versions-5": json.dumps({**data, "versions": 5, "mobile": {**data["mobile"], "ort": 7}})}
    text = named[report] if isinstance(report, str) else json.dumps(report)
    (out / "report.json").write_text(text)
    result = run_cli(["package", out, "--target", "mobile", "-o", out / "x.zip"])
    assert needle in _exit_2(result)


def test_a_corrupt_model_onnx_is_exit_2(run_cli, out):
    (out / "model.onnx").write_bytes(b"\x08\x07garbage" * 10)
    assert "not a valid ONNX model" in _exit_2(run_cli(["package", out, "--target", "mobile"]))


@pytest.mark.parametrize("link", ["tokenizer.json", "vocab.txt", "model.ort"])
def test_symlinked_files_are_refused_not_followed(run_cli, out, tmp_path, link):
    secret = tmp_path / "secret.txt"
    secret.write_text("host secret")
    target = out / link
    if target.exists():
        target.unlink()
    target.symlink_to(secret)
    line = _exit_2(run_cli(["package", out, "--target", "mobile", "-o", tmp_path / "b.zip"]))
    assert "symlink" in line and link in line
    assert not (tmp_path / "b.zip").exists()


def test_o_file_replaces_only_our_own_zip(run_cli, out, tmp_path):
    user_file = tmp_path / "mine.zip"
    user_file.write_text("my own file")
    line = _exit_2(run_cli(["package", out, "--target", "mobile", "-o", user_file]))
    assert "remove it or choose another -o" in line and user_file.read_text() == "my own file"
    link = tmp_path / "link.zip"
    link.symlink_to(user_file)
    _exit_2(run_cli(["package", out, "--target", "mobile", "-o", link]))
    assert link.is_symlink() and user_file.read_text() == "my own file"
    fresh = tmp_path / "fresh" / "b.zip"
    fresh.parent.mkdir()
    for _ in range(2):  # written, recorded, then replaced as our own
        result = run_cli(["package", out, "--target", "mobile", "-o", fresh])
        assert result.exit_code == 0, result.output
        assert owned(fresh.parent, "b.zip") and zipfile.is_zipfile(fresh)
    fresh.write_bytes(fresh.read_bytes() + b" edited")
    _exit_2(run_cli(["package", out, "--target", "mobile", "-o", fresh]))


def test_package_into_the_output_folder_keeps_it_replaceable(run_cli, out):
    for _ in range(2):
        result = run_cli(["package", out, "--target", "mobile"])
        assert result.exit_code == 0, result.output
    check_output(out)
    (out / "digits-cnn-mobile.zip").write_bytes(b"user edit")
    _exit_2(run_cli(["package", out, "--target", "mobile"]))
