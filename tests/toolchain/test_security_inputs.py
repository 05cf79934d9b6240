"""Issue 20 items 10, 11, 12 and 14: bad input is exit 2 with one line (never exit 3, never a
traceback, never a 4-line usage block), user code cannot set sqexport's exit code, recipes are
read strictly and cheaply, and messages say what report.json says."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]

USER_CODE = '''
import sys
import torch
from torch import nn


class Linear(nn.Module):
    def __init__(self, exit_when_batch_over=None):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.limit = exit_when_batch_over

    def forward(self, x):
        if self.limit is not None and x.shape[0] > self.limit:
            sys.exit(3)  # only on big batches: the load check passes, the export does not
        return self.fc(x)


class Scalar(Linear):
    def forward(self, x):
        return self.fc(x).sum()


class Boom(BaseException):
    pass


def exit0():
    sys.exit(0)


def exit_in_forward():
    return Linear(exit_when_batch_over=2)


def boom():
    raise Boom("from the factory")


def identity():
    return nn.Identity()


def scalar():
    return Scalar()


def linear():
    return Linear()
'''


@pytest.fixture
def project(user_project):
    (user_project / "mypkg" / "code.py").write_text(USER_CODE)
    (user_project / "mypkg" / "exits.py").write_text("import sys\nsys.exit(4)\n")
    return user_project


def _one_line(result, needle=None, code=2):
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output and "Usage:" not in result.output, result.output
    errors = [ln for ln in result.output.splitlines() if ln.startswith("Error")]
    assert len(errors) == 1, result.output
    if needle is not None:
        assert needle in errors[0], errors[0]
    return errors[0]


def _nothing_left(folder: Path, allowed=("mypkg",)):
    assert sorted(p for p in os.listdir(folder) if p not in allowed) == []


# ------------------------------------------------------------------ item 12: user code and the exit code

@pytest.mark.parametrize("ref, needle", [
    ("mypkg.code:exit0", "mypkg.code:exit0() called sys.exit(0)"),
    ("mypkg.exits:anything", "importing 'mypkg.exits' for mypkg.exits:anything called sys.exit(4)"),
    ("builtins:exit", "builtins:exit() called sys.exit"),
    ("builtins:quit", "builtins:quit() called sys.exit"),
    ("mypkg.code:boom", "mypkg.code:boom() failed: Boom: from the factory"),
    ("mypkg.code:exit_in_forward", "sys.exit(3)"),
])
def test_user_code_cannot_set_the_exit_code(project, run_cli, ref, needle):
    """Also: the folders made for `-o made/for/out` go again (exit_in_forward fails mid-run)."""
    _one_line(run_cli([ref, "--input-shape", "1x4", "-o", "made/for/out"]), needle)
    _nothing_left(project)


def test_the_console_script_contains_a_factorys_exit(project):
    proc = subprocess.run([sys.executable, "-m", "sqexport", "mypkg.code:exit0", "--input-shape", "1x4", "-o", "out"],
                          cwd=project, env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{project}"},
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith(("load ", "!"))]
    assert lines == ["Error: mypkg.code:exit0() called sys.exit(0); sqexport needs a factory that returns a model"]


# ------------------------------------------------------------------ item 10: exit 3 became exit 2 (or a result)

@pytest.mark.parametrize("ref, args, needle", [
    ("mypkg.code:identity", [], "has no parameters"),
    ("mypkg.code:scalar", [], "returns a scalar"),
    ("mypkg.code:linear", ["--input-shape", "1x1x999999x999999"], "the limit is"),
])
def test_models_and_shapes_sqexport_cannot_use(project, run_cli, ref, args, needle):
    _one_line(run_cli([ref, *(args or ["--input-shape", "1x4"]), "-o", "out"]), needle)
    _nothing_left(project)


def test_out_of_memory_is_exit_2(project, run_cli, monkeypatch):
    def huge(*args, **kwargs):
        raise MemoryError()
    monkeypatch.setattr("sqexport.models.zoo.load_model", huge)
    _one_line(run_cli(["digits-mlp", "-o", "out"]), "out of memory")


@pytest.mark.e2e
@pytest.mark.parametrize("samples", [1, 2, 3])
def test_too_few_samples_share_calibration_and_evaluation_and_say_so(project, run_cli, samples):
    np.save(project / "few.npy", np.random.default_rng(0).random((samples, 4), dtype=np.float32))
    # one to three samples: the gate is not under test (one flipped sample is a 33-100 point drop)
    result = run_cli(["mypkg.code:linear", "--input-shape", "1x4", "--calib-data", "few.npy", "-o", "out",
                      "--threads", "1", "--max-accuracy-drop", "100"])
    assert result.exit_code == 0, result.output  # a result, never an empty eval split
    report = json.loads((project / "out" / "report.json").read_text())
    assert report["data"]["eval"]["samples"] == samples and report["data"]["eval"]["shared"]
    assert "share them" in result.output and "never overlap" not in result.output


@pytest.mark.e2e
def test_a_one_image_folder_says_what_the_report_says(project, run_cli, images_factory):
    images_factory(project / "one", None, 1, size=(8, 8))
    result = run_cli(["mypkg.nets:tiny_cnn", "--input-shape", "1x3x8x8", "--calib-data", "one", "-o", "out",
                      "--threads", "1", "--max-accuracy-drop", "100"])  # one image: the gate is not under test
    assert result.exit_code == 0, result.output
    report = json.loads((project / "out" / "report.json").read_text())
    assert "share them" in report["data"]["eval"]["split"]
    assert "share them" in result.output and "never overlap" not in result.output
    assert any("share them" in n for n in report["notes"])


# ------------------------------------------------------------------ recipes: strict, cheap YAML (items 10, 11, 14)

BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]\n" for i in range(8))


@pytest.mark.parametrize("text, needle", [
    (BOMB, "aliases"),
    ("stages: " + "[" * 5000 + "]" * 5000 + "\n", "nested deeper"),
    ("stages: " + "{a: " * 3000 + "1" + "}" * 3000 + "\n", "nested deeper"),
    ("target: cpu\ntarget: mobile\n", "'target' appears twice"),
    ("stages:\n  - type: prune.magnitude\n    params: {sparsity: 0.5, sparsity: 0.9}\n", "'sparsity' appears twice"),
    ("gates:\n  max_accuracy_drop: 1\n  max_accuracy_drop: 2\n", "appears twice"),
    ("x" * (2 << 20), "larger than"),
])
def test_hostile_recipes_are_refused_cheaply(tmp_path, run_cli, monkeypatch, text, needle):
    """Cheaply: refused while the YAML is composed (or on the first duplicate key), before the
    expansion is built; the bomb used to build ~970 MB and print a 2.8 MB line."""
    from sqexport.toolchain import recipe_yaml

    built = []
    construct = recipe_yaml._StrictLoader.construct_object
    monkeypatch.setattr(recipe_yaml._StrictLoader, "construct_object",
                        lambda self, node, deep=False: built.append(node) or construct(self, node, deep))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text(text)
    line = _one_line(run_cli(["digits-mlp", "--recipe", "r.yaml", "-o", "out"]), needle)
    assert len(line) < 500
    if "twice" in needle:  # refused when its mapping is built: only the few keys before it were
        assert 0 < len(built) < 20, len(built)
    else:  # aliases, depth and size: refused before any object is built
        assert built == [], len(built)
    assert sorted(os.listdir(tmp_path)) == ["r.yaml"]


def test_a_merge_key_override_is_not_a_duplicate(tmp_path):
    from sqexport.toolchain.recipe_yaml import read_recipe_yaml

    (tmp_path / "r.yaml").write_text("base: &b {sparsity: 0.5}\nstage: {<<: *b, sparsity: 0.7}\n")
    assert read_recipe_yaml(tmp_path / "r.yaml")["stage"] == {"sparsity": 0.7}


# ------------------------------------------------------------------ item 11: one line

@pytest.mark.parametrize("args, needle", [
    (["digits-cnn", "--bogus"], "No such option"), (["check"], "Missing argument"),
    (["export", "digits-cnn", "--sparsity", "x"], "--sparsity"), (["bench", "x.zip"], "--device"),
    (["package", "out"], "--target"), (["inspect", "a", "b"], "unexpected extra argument"),
])
def test_usage_errors_are_one_line(run_cli, tmp_path, monkeypatch, args, needle):
    monkeypatch.chdir(tmp_path)
    result = run_cli(args)
    assert result.exit_code == 2 and [ln for ln in result.output.splitlines() if ln.strip()] == \
        [ln for ln in result.output.splitlines() if ln.startswith("Error")], result.output
    _one_line(result, needle)


def _console(args, cwd, env=None, drop=(), timeout=300):
    base = {k: v for k, v in os.environ.items() if k not in drop}
    return subprocess.run([sys.executable, "-m", "sqexport", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                          env={**base, "PYTHONPATH": str(ROOT), **(env or {})})


@pytest.mark.slow
def test_corrupt_torch_files_are_one_line_on_the_console(tmp_path):
    import zipfile

    (tmp_path / "bad.pt2").write_bytes(os.urandom(3000))
    with zipfile.ZipFile(tmp_path / "archive.pt2", "w") as zf:
        zf.writestr("archive/data.pkl", b"garbage")
    for name in ("bad.pt2", "archive.pt2"):
        proc = _console([name, "--input-shape", "1x4", "-q", "-o", "out"], tmp_path)
        assert proc.returncode == 2 and proc.stdout == "", proc.stderr
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith(f"Error: {name} is not an ExportedProgram"), proc.stderr
        assert "warnings above" not in lines[0]


@pytest.mark.e2e
def test_quiet_is_quiet_with_an_unusable_home(tmp_path):
    """HOME is a file: matplotlib cannot make its config folder and onnxruntime cannot persist its
    telemetry id; with --quiet neither says so."""
    (tmp_path / "home").write_text("a file, not a folder")
    proc = _console(["digits-mlp", "-q", "-o", "out", "--threads", "1"], tmp_path, {"HOME": str(tmp_path / "home")},
                    drop=("MPLCONFIGDIR", "XDG_CONFIG_HOME", "XDG_CACHE_HOME"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "" and proc.stdout == ""


@pytest.mark.parametrize("model", [".", "", "/", ".."])
def test_a_model_without_a_name_is_named_not_the_output_folder(run_cli, tmp_path, monkeypatch, model):
    (tmp_path / "work" / "sqexport-out" / "other").mkdir(parents=True)
    (tmp_path / "work" / "sqexport-out" / "mine.txt").write_text("user file")
    monkeypatch.chdir(tmp_path / "work")
    line = _one_line(run_cli([model]), f"cannot load {model!r}" if model in ("", "/") else "cannot load")
    assert "sqexport-out" not in line and "built-in" in line or "not a built-in name" in line
    assert (tmp_path / "work" / "sqexport-out" / "mine.txt").read_text() == "user file"


def test_no_progress_line_after_the_interrupt(capsys):
    """A `track` generator closed after the error (when its frame is freed) printed its task line
    after "interrupted"; once a signal arrived, progress prints nothing more."""
    from sqexport.contracts.progress import track
    from sqexport.toolchain import signals
    from sqexport.toolchain.progress import PlainProgress

    progress = PlainProgress(sys.stderr)
    items = track(progress, [1, 2, 3], "evaluation", "batches")
    next(items)
    signals._pending.append(15)
    try:
        items.close()  # the late finalization
        progress.message("late")
    finally:
        signals._pending.remove(15)
    assert capsys.readouterr().err == ""
