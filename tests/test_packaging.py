"""Issue 21 item 1: the install is one import namespace. The wheel built from this checkout holds
`sqexport/` and its dist-info and nothing else at the top level; the layer folders (contracts,
models, exporters, runtime_check, toolchain) land under `sqexport/`, with the package data the
code reads by path (the built-in weights, the corpora, the device runner)."""
import configparser
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("contracts", "models", "exporters", "runtime_check", "toolchain")
# what a build must not read or write in the copy it builds from
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.pyc",
                                    "sqexport-out", ".pytest_cache")


def _setup_cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return cfg


def _version() -> str:
    return _setup_cfg()["metadata"]["version"]


def _package_data() -> list[Path]:
    """The checkout's files that setup.cfg's [options.package_data] promises to install."""
    files = []
    for package, patterns in _setup_cfg()["options.package_data"].items():
        folder = ROOT / package.removeprefix("sqexport.").replace(".", "/")
        for pattern in patterns.replace("\n", ",").split(","):
            if pattern.strip():
                files += sorted(folder.glob(pattern.strip()))
    return files


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built offline from a copy of the checkout (pip builds in the source tree: build/ and
    *.egg-info must not appear in the checkout under test)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=NOT_SOURCE)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "-w", str(tmp / "dist"), str(src)], capture_output=True, text=True, timeout=600,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (built,) = (tmp / "dist").glob("sqexport-*.whl")
    return built


def _names(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as zf:
        return zf.namelist()


@pytest.mark.slow
def test_the_wheel_holds_only_the_sqexport_namespace(wheel):
    tops = {name.split("/", 1)[0] for name in _names(wheel)}
    assert tops == {"sqexport", f"sqexport-{_version()}.dist-info"}, sorted(tops)


@pytest.mark.slow
def test_every_layer_module_and_data_file_lands_under_sqexport(wheel):
    names = set(_names(wheel))
    # every module of every layer folder (a new subpackage missing from setup.cfg's list shows here)
    for layer in LAYERS:
        for path in (ROOT / layer).rglob("*.py"):
            rel = path.relative_to(ROOT).as_posix()
            assert f"sqexport/{rel}" in names, f"{rel} is not installed as sqexport/{rel}"
    # the package data the code opens by path: what setup.cfg names, and every corpus and weight file
    data = {*_package_data(), *(ROOT / "models" / "weights").glob("*.pt"), *(ROOT / "models" / "corpus").iterdir()}
    assert data, "no package data found in the checkout"
    for path in sorted(data):
        rel = path.relative_to(ROOT).as_posix()
        assert f"sqexport/{rel}" in names, f"{rel} is not installed as sqexport/{rel}"
    assert "sqexport/runtime_check/device_runner.py" in names  # read by path and copied to a device
    assert not any(n.startswith(("sqexport/tests/", "sqexport/benchmarks/", "sqexport/scripts/")) for n in names)


@pytest.mark.slow
def test_installed_wheel_adds_only_sqexport_and_reads_its_files_from_the_install(wheel, tmp_path):
    """Installed into an empty folder (`pip install --target`, no dependencies: this venv has them),
    only `sqexport`, its dist-info and the console script appear, and the installed package, not
    this checkout, is what `import sqexport` finds."""
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target",
                           str(target), str(wheel)], capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(os.listdir(target)) == sorted(["bin", "sqexport", f"sqexport-{_version()}.dist-info"])
    assert os.listdir(target / "bin") == ["sqexport"]
    probe = ("import sqexport, sqexport.runtime_check.arm64 as a, sqexport.models.digits as d, pathlib;"
             "print(pathlib.Path(sqexport.__file__).parent); print(list(sqexport.__path__)); print(a.RUNNER.is_file());"
             "print(pathlib.Path(a.RUNNER).parent == pathlib.Path(a.__file__).parent); print(pathlib.Path(d.__file__).parent)")
    env = {**os.environ, "PYTHONPATH": str(target)}
    proc = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    package, path, runner_found, runner_beside, models = proc.stdout.splitlines()
    assert package == str(target / "sqexport") and path == repr([str(target / "sqexport")])
    assert runner_found == "True" and runner_beside == "True"
    assert models == str(target / "sqexport" / "models")
