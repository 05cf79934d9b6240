"""`sqexport sweep` input checks: the sweep file is parsed with the export command's own parser,
so every mistake is one line and exit 2, before any job runs (nothing is written)."""
import pytest

from conftest import invoke_cli
from sqexport.toolchain.cli import sweep_jobs


def _write(tmp_path, text):
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return path


def _fails(tmp_path, text, *expected, extra=()):
    path = _write(tmp_path, text)
    result = invoke_cli(["sweep", path, "-o", tmp_path / "root", *extra])
    assert result.exit_code == 2, result.output
    line = result.output.strip()
    assert "\n" not in line and "Traceback" not in result.output
    for text in expected:
        assert text in line, line
    assert not (tmp_path / "root").exists()


@pytest.mark.parametrize("text, expected", [
    ("jobs:\n  - {name: a, model: digits-mlp, colour: red}\n", ["jobs[0] (a)", "unknown option 'colour'"]),
    ("jobs:\n  - {name: a, model: digits-mlp, sparsity: 2}\n", ["jobs[0] (a)", "sparsity"]),
    ("jobs:\n  - {name: a, model: digits-mlp, prune: bogus}\n", ["jobs[0] (a)", "bogus"]),
    ("jobs:\n  - {name: a, model: digits-mlp}\n  - {name: a, model: digits-cnn}\n", ["'a' is used twice"]),
    ("jobs:\n  - {name: ../x, model: digits-mlp}\n", ["plain folder name"]),
    ("jobs:\n  - {name: a, model: digits-mlp, output: /tmp/x}\n", ["cannot be set per job"]),
    ("jobs:\n  - {name: a, model: digits-mlp, auto: true, prune: nm}\n", ["--auto chooses"]),
    ("jobs:\n  - {name: a, model: digits-mlp, recover: 3}\n", ["recover must be true or false"]),
    ("jobs:\n  - {name: a}\n", ["'model' is required"]),
    ("jobs: []\n", ["non-empty list"]),
    ("job:\n  - {name: a, model: digits-mlp}\n", ["unknown key(s) job"]),
    ("jobs:\n  - {name: sweep.json, model: digits-mlp}\n", ["sweep's own report file"]),
])
def test_bad_sweep_files_are_one_line_exit_2(tmp_path, text, expected):
    _fails(tmp_path, text, *expected)


def test_ray_flag_without_ray_names_the_extra(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    _fails(tmp_path, "jobs:\n  - {name: a, model: digits-mlp}\n", "sqexport[ray]", extra=["--ray", "local:2"])
    result = invoke_cli(["digits-mlp", "--auto", "--ray", "local:2", "-o", tmp_path / "o"])
    assert result.exit_code == 2 and "sqexport[ray]" in result.output


def test_ray_flag_checks(tmp_path):
    _fails(tmp_path, "jobs:\n  - {name: a, model: digits-mlp}\n", "--workers", extra=["--ray", "local:2", "--workers", "2"])
    result = invoke_cli(["digits-mlp", "--ray", "local:2", "-o", tmp_path / "o"])
    assert result.exit_code == 2 and "--ray distributes --auto" in result.output
    result = invoke_cli(["digits-mlp", "--auto", "--ray", "nowhere", "-o", tmp_path / "o"])
    assert result.exit_code == 2 and "expected local:N" in result.output


def test_jobs_are_command_lines_with_a_normalized_spec_hash(tmp_path):
    (tmp_path / "calib.npy").write_bytes(b"not read here")
    path = _write(tmp_path, "defaults: {seed: 3}\njobs:\n"
                            "  - {name: a, model: digits-cnn, prune: nm, nm: 2:4, sparsity: 0.50}\n"
                            "  - {name: b, model: digits-cnn, sparsity: .5, calib_data: calib.npy, recover: false}\n")
    with pytest.raises(Exception, match="--sparsity does not apply"):
        sweep_jobs(path)  # nm takes --nm, not --sparsity: the export command's own rule
    path = _write(tmp_path, "defaults: {seed: 3}\njobs:\n"
                            "  - {name: a, model: digits-cnn, prune: nm, nm: 2:4}\n"
                            "  - {name: b, model: digits-cnn, sparsity: .5, calib_data: calib.npy, recover: false}\n"
                            "  - {name: c, model: digits-cnn, sparsity: 0.50, calib_data: calib.npy, recover: false}\n")
    a, b, c = sweep_jobs(path)
    assert a.argv == ("digits-cnn", "--nm", "2:4", "--prune", "nm", "--seed", "3")  # 2:4 stays text, not 124
    assert b.argv[b.argv.index("--calib-data") + 1] == str(tmp_path / "calib.npy")  # relative to the file
    assert "--no-recover" in b.argv and b.paths == (b.argv.index("--calib-data") + 1,)
    assert b.spec_hash == c.spec_hash != a.spec_hash  # 0.50 and .5 are the same option
    (tmp_path / "calib.npy").write_bytes(b"changed")
    assert sweep_jobs(path)[1].spec_hash != b.spec_hash  # an input's content is part of the spec
