"""Data and model files: unreadable, mistyped, empty, non-finite or mislabelled input is exit 2 with
one line naming the file, before any output is written; never exit 1/3 and never a wrong result."""
import os
import shutil

import numpy as np
import pytest


def _check(result, workdir, inputs):
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output and "Aborted" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, result.output
    assert sorted(os.listdir(workdir)) == sorted(inputs), "output left behind"
    return errors[0]


def _pixels(n=8, fill=0.5):
    return np.full((n, 1, 8, 8), fill, np.float32)


TENSOR_FILES = {
    "empty-file": (lambda p: p.write_bytes(b""), ".npy", "cannot read"),
    "garbage": (lambda p: p.write_bytes(b"\x93NUMPY garbage"), ".npy", "cannot read"),
    "zero-rows": (lambda p: np.save(p, _pixels(0)), ".npy", "non-zero"),
    "strings": (lambda p: np.save(p, np.full((8, 1, 8, 8), "a")), ".npy", "numbers"),
    "nan": (lambda p: np.save(p, _pixels(fill=np.nan)), ".npy", "NaN"),
    "inf": (lambda p: np.save(p, _pixels(fill=np.inf)), ".npy", "infinite"),
    "beyond-float32": (lambda p: np.save(p, np.full((8, 1, 8, 8), 1e300)), ".npy", "infinite"),
    "bad-zip": (lambda p: p.write_bytes(b"PK\x03\x04broken"), ".npz", "cannot read"),
    "labels-nan": (lambda p: np.savez(p, pixels=_pixels(), labels=np.full(8, np.nan)), ".npz", "NaN"),
    "labels-strings": (lambda p: np.savez(p, pixels=_pixels(), labels=np.array(["cat"] * 8)), ".npz", "labels"),
    "labels-2d": (lambda p: np.savez(p, pixels=_pixels(), labels=np.zeros((8, 1), int)), ".npz", "shape"),
    "labels-count": (lambda p: np.savez(p, pixels=_pixels(), labels=np.zeros(5, int)), ".npz", "shape"),
    "labels-negative": (lambda p: np.savez(p, pixels=_pixels(), labels=-np.ones(8, int)), ".npz", ">= 0"),
    "labels-too-big": (lambda p: np.savez(p, pixels=_pixels(), labels=np.full(8, 10)), ".npz", "10 classes"),
    "labels-fractions": (lambda p: np.savez(p, pixels=_pixels(), labels=np.full(8, 0.5)), ".npz", "whole"),
}


@pytest.mark.parametrize("flag", ["--calib-data", "--eval-data"])
@pytest.mark.parametrize("make, suffix, needle", TENSOR_FILES.values(), ids=TENSOR_FILES.keys())
def test_bad_tensor_data_for_export(run_cli, tmp_path, monkeypatch, make, suffix, needle, flag):
    monkeypatch.chdir(tmp_path)
    make(tmp_path / f"data{suffix}")
    line = _check(run_cli(["export", "digits-mlp", flag, f"data{suffix}", "-o", "out"]), tmp_path,
                  [f"data{suffix}"])
    assert needle in line and "data" in line


@pytest.mark.parametrize("labels, needle", [(np.full(150, np.nan), "NaN"), (np.full(150, 37), "37")],
                         ids=["nan", "out-of-range"])
def test_bad_labels_for_check(run_cli, tmp_path, default_export, digits_split, labels, needle):
    data = tmp_path / "eval.npz"
    np.savez(data, pixels=digits_split.x_eval[:150], labels=labels)
    line = _check(run_cli(["check", default_export.out / "model.onnx", "--eval-data", data]), tmp_path,
                  ["eval.npz"])
    assert needle in line


def _hf_copy(src, dst, drop=(), config=None):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*drop))
    if config is not None:
        (dst / "config.json").write_bytes(config)
    return dst


HF_CASES = {
    "no-tokenizer": (("tokenizer*", "vocab.txt", "special_tokens_map.json"), None, "no tokenizer files"),
    "config-list": ((), b"[1, 2]", "JSON object"),
    "config-architectures-ints": ((), b'{"architectures": [1], "model_type": "bert"}', "architectures"),
    "config-not-utf8": ((), b'{"model_type": "b\xe9rt"}', "UTF-8"),
    "config-not-json": ((), b"{model_type: bert", "JSON"),
}


@pytest.mark.parametrize("drop, config, needle", HF_CASES.values(), ids=HF_CASES.keys())
def test_bad_hugging_face_folder(run_cli, tmp_path, tiny_bert, drop, config, needle):
    model = _hf_copy(tiny_bert, tmp_path / "m", drop, config)
    line = _check(run_cli(["export", model, "-o", tmp_path / "out"]), tmp_path, ["m"])
    assert needle in line


def test_corrupt_tokenizer_config_for_check(run_cli, tmp_path, text_files, tiny_bert):
    folder = tmp_path / "exported"
    folder.mkdir()
    shutil.copy(tiny_bert / "tokenizer_config.json", folder)
    (folder / "tokenizer_config.json").write_text("{not json")
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["input_ids"], ["out"])], "g",
                              [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])],
                              [helper.make_tensor_value_info("out", TensorProto.INT64, ["b", "s"])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), folder / "model.onnx")
    line = _check(run_cli(["check", folder / "model.onnx", "--eval-data", text_files.eval_txt]), tmp_path,
                  ["exported"])
    assert "tokenizer" in line
