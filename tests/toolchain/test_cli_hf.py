"""End to end through the CLI on tiny random BERT folders: `sqexport export FOLDER --calib-data
x.txt --eval-data y.txt -o OUT` (feature extraction, int8 and int8-dynamic, a classifier with
labelled .jsonl, --sparsity) and bad text data (exit 2, nothing left behind)."""
import json
import os
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from sqexport.models.hf import mean_pool
from sqexport.runtime_check.isa import weight_grid
from sqexport.toolchain.quantization.fallback import MAX_PASSES
from sqexport.contracts.quant import quantize_weight_per_channel

# the four required artifacts (model, baseline, report.json, report.md) plus the tokenizer an app needs beside model.onnx
EXPECTED_FILES = sorted(["baseline.onnx", "model.onnx", "report.json", "report.md", "special_tokens_map.json",
                         "tokenizer.json", "tokenizer_config.json", "vocab.txt"])
EXPECTED_FILES = sorted(EXPECTED_FILES + [".sqexport-manifest.json"])  # what sqexport wrote, for re-runs
OPTIMUM_INPUTS = {"input_ids", "attention_mask", "token_type_ids"}
ENCODER_LINEARS = [f"encoder.layer.{i}.{name}" for i in range(2) for name in (
    "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
    "intermediate.dense", "output.dense")]


def _export(run_cli, tmp_path_factory, folder, *args):
    out = tmp_path_factory.mktemp("hf-export") / "out"
    result = run_cli(["export", folder, *args, "--threads", 1, "-o", out])
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").is_file() else None
    return SimpleNamespace(result=result, out=out, report=report)


@pytest.fixture(scope="module")
def fe(run_cli, tmp_path_factory, tiny_bert, text_files):
    """Feature extraction, every default (static int8, no pruning)."""
    return _export(run_cli, tmp_path_factory, tiny_bert, "--calib-data", text_files.calib_txt,
                   "--eval-data", text_files.eval_txt, "--max-accuracy-drop", 1)


@pytest.fixture(scope="module")
def dyn(run_cli, tmp_path_factory, tiny_bert, text_files):
    return _export(run_cli, tmp_path_factory, tiny_bert, "--quant", "int8-dynamic", "--calib-data",
                   text_files.calib_txt, "--eval-data", text_files.eval_txt, "--max-accuracy-drop", 1)


@pytest.fixture(scope="module")
def cls(run_cli, tmp_path_factory, tiny_bert_cls, text_files):
    """Classifier, labelled eval data; 50% magnitude sparsity. A random head is a coin flip, so the
    gate is wide open: this checks the path, not the accuracy."""
    return _export(run_cli, tmp_path_factory, tiny_bert_cls, "--sparsity", 0.5, "--calib-data",
                   text_files.calib_txt, "--eval-data", text_files.eval_jsonl, "--max-accuracy-drop", 100)


@pytest.fixture(scope="module")
def sparse(run_cli, tmp_path_factory, tiny_bert, text_files):
    return _export(run_cli, tmp_path_factory, tiny_bert, "--sparsity", 0.5, "--calib-data",
                   text_files.calib_txt, "--eval-data", text_files.eval_txt, "--max-accuracy-drop", 1)


@pytest.fixture(scope="module")
def tokenizer(tiny_bert):
    return AutoTokenizer.from_pretrained(str(tiny_bert))


def _ok(run):
    assert run.result.exit_code == 0, run.result.output
    assert sorted(os.listdir(run.out)) == sorted(EXPECTED_FILES + list(run.report["plots"].values()))
    assert os.listdir(run.out.parent) == [run.out.name]  # no temp folders left
    return run.report


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _feeds(tokenizer, texts):
    """Two different batch / sequence shapes."""
    for batch in (texts[:1], texts[2:5]):
        enc = tokenizer(batch, padding=True, return_tensors="np")
        yield {k: np.asarray(v, np.int64) for k, v in enc.items()}


def _cosine(a, b):
    a, b = a / np.linalg.norm(a, axis=-1, keepdims=True), b / np.linalg.norm(b, axis=-1, keepdims=True)
    return (a * b).sum(-1)


# ---------------------------------------------------------------- feature extraction, static int8

@pytest.mark.e2e
def test_feature_extraction_export(fe, tiny_bert):
    rep = _ok(fe)
    assert rep["model"] == tiny_bert.name and rep["task"] == "feature-extraction" and rep["passed"] is True
    assert tiny_bert.name in fe.result.output and "cosine" in fe.result.output


@pytest.mark.e2e
def test_embedding_accuracy_is_cosine_with_spearman(fe, text_files):
    acc = _ok(fe)["accuracy"]
    assert acc["metric"] == "cosine" and acc["baseline"] == 1.0
    assert {"min_cosine", "spearman"} <= set(acc)
    assert -1.0 <= acc["min_cosine"] <= acc["model"] <= 1.0 + 1e-9
    assert acc["drop"] == pytest.approx(1.0 - acc["model"])
    assert acc["model"] > 0.99 and acc["spearman"] > 0.9  # int8 of a tiny random BERT barely moves it
    check, finite = fe.report["checks"]
    assert check == {"name": "accuracy_drop", "passed": True, "value": acc["drop"], "limit": 1.0,
                     "unit": "1-cosine"}
    assert finite["name"] == "finite_outputs" and finite["passed"] and finite["value"] == 0.0


@pytest.mark.e2e
def test_embedding_units_agree_across_console_md_and_json(fe, units_agree):
    _ok(fe)
    units_agree(fe.result.stdout, fe.out)
    acc = fe.report["accuracy"]
    assert (acc["unit"], acc["drop_unit"]) == ("cosine", "1-cosine")


@pytest.mark.e2e
def test_no_pruning_by_default_for_hf(fe):
    rep = _ok(fe)
    names = [s["name"] for s in rep["stages"]]
    assert not any(n.startswith("prune.") for n in names)
    assert "transform.smoothquant" in names and "quantize.int8" in names
    assert names.index("transform.smoothquant") < names.index("export.model") < names.index("quantize.int8")
    assert rep["sparsity"]["overall"] == 0.0
    assert set(rep["sparsity"]["layers"]) == set(ENCODER_LINEARS)
    assert set(rep["sparsity"]["layers"].values()) == {0.0}
    assert not any(s["type"].startswith("prune") for s in rep["recipe"]["stages"])
    # smoothing alone changed the model: prepared.onnx came from the baseline graph, no second export
    export = next(s for s in rep["stages"] if s["name"] == "export.model")
    assert export["params"]["derived_from"] == "baseline.onnx" and "derive_skipped" not in export["params"]
    assert export["params"]["smoothed_groups"] == 8  # per layer: Q/K/V, attention output, intermediate, output


@pytest.mark.e2e
def test_quantization_info(fe, onnx_tools):
    q = _ok(fe)["quantization"]
    assert q["int8_embeddings"] == ["embeddings.word_embeddings"]
    assert q["quantized_layers"] == len(ENCODER_LINEARS)  # the pooler is not in the feature graph
    assert q["fallback"] == [] and len(q["predicted_drop_trace"]) == 1
    # the default recipe smooths first: its statistics pass gave the min-max ranges (no own pass)
    calib = q["calibration"]
    assert calib["pass"] == "shared with transform.smoothquant"
    # so the default observer keeps min-max without scoring a percentile clip
    choice = q["range_choice"]
    assert choice["chosen"] == "minmax" and choice["output_error"] == {}
    assert "shared with transform.smoothquant" in choice["why"]
    assert calib["samples"] == q["snr_sample"]["calibration_samples"] > 0  # every calibration sample
    assert q["snr_sample"]["linear_row_fraction"] == 0.5
    model = onnx.load(str(fe.out / "model.onnx"))
    assert len(onnx_tools.quantized_weights(model)) == q["quantized_layers"]
    assert onnx_tools.op_count(model, "QuantizeLinear") > 0 and onnx_tools.op_count(model, "DequantizeLinear") > 0
    # the ONNX model reproduces the torch fake-quant model
    fid = fe.report["fidelity"]
    assert fid["max_abs_deviation"] <= 1e-3 * fid["reference_max_abs"]


@pytest.mark.e2e
def test_model_onnx_runs_with_dynamic_batch_and_sequence(fe, tokenizer, text_files):
    _ok(fe)
    model, base = _session(fe.out / "model.onnx"), _session(fe.out / "baseline.onnx")
    for sess in (model, base):
        assert {i.name for i in sess.get_inputs()} == OPTIMUM_INPUTS
        for i in sess.get_inputs():
            assert len(i.shape) == 2 and all(isinstance(d, str) for d in i.shape), i.shape  # symbolic axes
        assert [o.name for o in sess.get_outputs()] == ["last_hidden_state"]
    shapes = set()
    for feed in _feeds(tokenizer, text_files.sentences):
        (hidden,) = model.run(None, feed)
        shapes.add(feed["input_ids"].shape)
        assert hidden.shape == feed["input_ids"].shape + (32,)
        pooled, ref = mean_pool([hidden], feed), mean_pool(base.run(None, feed), feed)
        assert _cosine(pooled, ref).min() > 0.99
    assert len(shapes) == 2 and len({s[0] for s in shapes}) == 2 and len({s[1] for s in shapes}) == 2


# ---------------------------------------------------------------- int8-dynamic

@pytest.mark.e2e
def test_int8_dynamic(dyn, onnx_tools, tokenizer, text_files):
    rep = _ok(dyn)
    names = [s["name"] for s in rep["stages"]]
    assert "quantize.int8-dynamic" in names and "quantize.int8" not in names
    assert rep["accuracy"]["metric"] == "cosine" and rep["accuracy"]["model"] > 0.99
    assert rep["quantization"]["int8_embeddings"] == ["embeddings.word_embeddings"]
    model = onnx.load(str(dyn.out / "model.onnx"))
    assert onnx_tools.op_count(model, "MatMulInteger") == rep["quantization"]["quantized_layers"] == 12
    assert onnx_tools.op_count(model, "DynamicQuantizeLinear") >= 8  # one per distinct Linear input
    # the word-embedding table: DequantizeLinear -> Gather -> Q/DQ
    assert onnx_tools.op_count(model, "QuantizeLinear") == 1
    assert rep["fidelity"]["max_abs_deviation"] <= 1e-3 * rep["fidelity"]["reference_max_abs"]
    sess, base = _session(dyn.out / "model.onnx"), _session(dyn.out / "baseline.onnx")
    assert {i.name for i in sess.get_inputs()} == OPTIMUM_INPUTS
    for feed in _feeds(tokenizer, text_files.sentences):
        pooled = mean_pool(sess.run(None, feed), feed)
        assert _cosine(pooled, mean_pool(base.run(None, feed), feed)).min() > 0.99


# ---------------------------------------------------------------- classifier with labels, sparsity

@pytest.mark.e2e
def test_classifier_with_labelled_jsonl_reports_top1(cls, text_files):
    rep = _ok(cls)
    assert rep["task"] == "sequence-classification"
    acc = rep["accuracy"]
    assert acc["metric"] == "top1"
    assert 0.0 <= acc["baseline"] <= 100.0 and 0.0 <= acc["model"] <= 100.0  # percent
    assert acc["drop"] == pytest.approx(acc["baseline"] - acc["model"])
    assert rep["checks"][0]["unit"] == acc["drop_unit"] == "points"
    # top-1 against the labels is a multiple of 100/20 % (20 labelled texts)
    n = len(text_files.labels)
    assert acc["baseline"] * n / 100 == pytest.approx(round(acc["baseline"] * n / 100))
    sess = _session(cls.out / "model.onnx")
    assert [o.name for o in sess.get_outputs()] == ["logits"]
    assert {i.name for i in sess.get_inputs()} == OPTIMUM_INPUTS


@pytest.mark.e2e
def test_sparsity_prunes_only_encoder_linears_of_a_classifier(cls, tiny_bert_cls, onnx_tools):
    rep = _ok(cls)
    layers = rep["sparsity"]["layers"]
    assert set(layers) == {"bert." + n for n in ENCODER_LINEARS}
    assert rep["sparsity"]["overall"] == pytest.approx(0.5, abs=1e-3)
    model = onnx.load(str(cls.out / "model.onnx"))
    rows = onnx_tools.quantized_weights(model)
    # pooler and classifier (Gemm) are stored exactly as the int8 of their dense weights
    torch_model = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert_cls))
    heads = [torch_model.bert.pooler.dense.weight, torch_model.classifier.weight]
    gemms = [r for r in rows if r.node.op_type == "Gemm"]
    assert len(gemms) == 2
    for w in heads:
        expected = quantize_weight_per_channel(w.detach().numpy(), weight_grid("cpu")).q
        assert any(r.q.shape == expected.shape and np.array_equal(r.q, expected) for r in gemms)
    encoder_q = np.concatenate([r.q.ravel() for r in rows if r.node.op_type == "MatMul"])
    assert (encoder_q == 0).mean() >= 0.5  # the pruned zeros are exact int8 zeros


@pytest.mark.e2e
def test_sparsity_on_feature_extraction_prunes_encoder_only(sparse):
    rep = _ok(sparse)
    layers = rep["sparsity"]["layers"]
    assert layers and all(name.startswith("encoder.") for name in layers)
    assert set(layers) == set(ENCODER_LINEARS)
    assert rep["sparsity"]["overall"] == pytest.approx(0.5, abs=1e-3)
    names = [s["name"] for s in rep["stages"]]
    assert names.index("prune.magnitude") < names.index("transform.smoothquant") < names.index("quantize.int8")
    export = next(s for s in rep["stages"] if s["name"] == "export.model")
    assert "derived_from" not in export["params"]
    assert export["params"]["derive_skipped"] == "prune.magnitude changes the model: it is exported"


# ---------------------------------------------------------------- accuracy-aware fallback

@pytest.fixture(scope="module")
def strict(run_cli, tmp_path_factory, tiny_bert, text_files):
    """A gate no int8 model can meet: the fallback returns its maximum share of layers to FP32."""
    return _export(run_cli, tmp_path_factory, tiny_bert, "--calib-data", text_files.calib_txt,
                   "--eval-data", text_files.eval_txt, "--max-accuracy-drop", 1e-12)


@pytest.mark.e2e
def test_fallback_when_the_gate_cannot_hold(strict, onnx_tools):
    assert strict.result.exit_code == 1, strict.result.output  # the gate fails ...
    assert sorted(os.listdir(strict.out)) == sorted(EXPECTED_FILES + list(strict.report["plots"].values()))  # ... and everything is still written
    assert sum(line.startswith("Error") for line in strict.result.output.splitlines()) == 1
    rep = strict.report
    assert rep["passed"] is False and rep["checks"][0]["passed"] is False
    q = rep["quantization"]
    # FallbackPolicy: the cap of 25% adapts up to 50% when the gate still fails at 25%
    max_layers = int(len(ENCODER_LINEARS) * 0.5)
    assert len(q["fallback"]) == max_layers
    assert q["fallback_cap"]["raised"] and not q["fallback_cap"]["holds"]
    assert any("cap raised" in note for note in rep["notes"]) and any("still above" in n for n in rep["notes"])
    assert 2 <= q["fallback_passes"] <= MAX_PASSES and q["predicted_drop_trace"][-1] > 1e-12
    assert q["quantized_layers"] == len(ENCODER_LINEARS) - max_layers
    # worst first by each layer's output error alone in int8 (a tiny encoder: affordable), in order
    assert q["fallback_ranking"]["by"].startswith("output error") and q["fallback_ranking"]["samples"] > 0
    scores = [f["output_snr_db"] for f in q["fallback"]]
    assert scores == sorted(scores) and all("snr_db" in f for f in q["fallback"])
    assert any("fallback" in note for note in rep["notes"])
    model = onnx.load(str(strict.out / "model.onnx"))
    assert len(onnx_tools.quantized_weights(model)) == q["quantized_layers"]
    float_inits = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    fp32_matmuls = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in float_inits]
    assert len(fp32_matmuls) == max_layers  # the fallen layers keep their FP32 weights


# ---------------------------------------------------------------- bad text data

@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    files = {
        "bad_json.jsonl": '{"text": "fine"}\n{"text": broken\n',
        "no_text.jsonl": '{"text": "fine"}\n{"sentence": "no text key"}\n',
        "some_labels.jsonl": '{"text": "a", "label": "pos"}\n{"text": "b"}\n',
        "unknown_label.jsonl": '{"text": "a", "label": "pos"}\n{"text": "b", "label": "meh"}\n',
        "texts.csv": "text\nhello\n",
        "empty.txt": "\n\n",
    }
    for name, content in files.items():
        (tmp_path / name).write_text(content)
    return tmp_path


@pytest.mark.parametrize("model, args, needle", [
    ("tiny_bert", ["--calib-data", "bad_json.jsonl"], "bad_json.jsonl:2"),
    ("tiny_bert", ["--eval-data", "no_text.jsonl"], "no_text.jsonl:2"),
    ("tiny_bert_cls", ["--eval-data", "some_labels.jsonl"], "every line or on none"),
    ("tiny_bert_cls", ["--eval-data", "unknown_label.jsonl"], "meh"),
    ("tiny_bert", ["--calib-data", "texts.csv"], "texts.csv"),
    ("tiny_bert", ["--eval-data", "empty.txt"], "no texts"),
    ("tiny_bert", ["--calib-data", "missing.txt"], "missing.txt"),
    ("tiny_bert", ["--task", "translation"], "task"),
], ids=["bad-json", "no-text", "some-labels", "unknown-label", "csv", "empty", "missing", "bad-task"])
def test_bad_text_data_exit_2(request, run_cli, workdir, model, args, needle):
    before = sorted(os.listdir(workdir))
    folder = request.getfixturevalue(model)
    result = run_cli(["export", folder, *args, "-o", "out"])
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, result.output
    assert needle in errors[0]
    assert sorted(os.listdir(workdir)) == before, "output left behind"


@pytest.mark.e2e
def test_distilbert_takes_no_token_type_ids(run_cli, tmp_path_factory, tiny_bert, text_files):
    """Input names follow the model's forward signature, not just the tokenizer (DistilBERT)."""
    import torch
    from transformers import AutoTokenizer as Tok, DistilBertConfig, DistilBertModel

    folder = tmp_path_factory.mktemp("hf") / "tiny-distilbert"
    tok = Tok.from_pretrained(str(tiny_bert))
    torch.manual_seed(0)
    DistilBertModel(DistilBertConfig(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                     max_position_embeddings=128)).save_pretrained(folder)
    tok.save_pretrained(folder)
    run = _export(run_cli, tmp_path_factory, folder, "--calib-data", text_files.calib_txt,
                  "--eval-data", text_files.eval_txt, "--max-accuracy-drop", 1)
    assert run.result.exit_code == 0, run.result.output
    names = {i.name for i in onnx.load(str(run.out / "model.onnx")).graph.input}
    assert names == {"input_ids", "attention_mask"}
    assert run.report["quantization"]["quantized_layers"] == 12  # q, k, v, out, ffn1, ffn2 x 2 layers


@pytest.mark.e2e
def test_export_ships_the_tokenizer_and_check_reads_text(run_cli, fe, text_files):
    assert (fe.out / "tokenizer_config.json").is_file() and (fe.out / "tokenizer.json").is_file()
    result = run_cli(["check", fe.out / "model.onnx", "--baseline", fe.out / "baseline.onnx",
                      "--eval-data", text_files.eval_txt, "--threads", 1, "--json", "--max-accuracy-drop", 1])
    assert result.exit_code == 0, result.output
    checked = json.loads(result.output)
    # the same texts, model and pooling as the export's own verification
    assert checked["accuracy"]["metric"] == "cosine"
    assert checked["accuracy"]["model"] == pytest.approx(fe.report["accuracy"]["model"], abs=1e-6)


@pytest.mark.e2e
def test_check_on_text_without_a_tokenizer_is_bad_input(run_cli, fe, text_files, tmp_path):
    import shutil

    shutil.copy(fe.out / "model.onnx", tmp_path / "model.onnx")
    result = run_cli(["check", tmp_path / "model.onnx", "--eval-data", text_files.eval_txt])
    assert result.exit_code == 2
    assert "tokenizer" in result.output and "Traceback" not in result.output


@pytest.mark.e2e
def test_a_model_with_fewer_positions_than_the_default_length(run_cli, tmp_path_factory, text_files):
    """A small classifier trained with max_position_embeddings 16: texts are cut to 16 tokens in
    export, in recovery and in `sqexport check` (the saved tokenizer says so), never to the default
    128 its position table cannot index."""
    from transformers import BertForSequenceClassification

    from conftest import _bert_config, _save_tiny

    config = _bert_config(num_labels=2, id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1})
    config.max_position_embeddings = 16
    folder = _save_tiny(tmp_path_factory.mktemp("hf") / "short-bert", BertForSequenceClassification, config)
    run = _export(run_cli, tmp_path_factory, folder, "--calib-data", text_files.calib_txt,
                  "--eval-data", text_files.eval_jsonl, "--max-accuracy-drop", 100)
    _ok(run)
    assert json.loads((run.out / "tokenizer_config.json").read_text())["model_max_length"] == 16
    # labelled by name: the class names travel in model.onnx's metadata
    checked = run_cli(["check", run.out / "model.onnx", "--baseline", run.out / "baseline.onnx", "--eval-data",
                       text_files.eval_jsonl, "--threads", 1, "--max-accuracy-drop", 100, "--json"])
    assert checked.exit_code == 0, checked.output
    result = json.loads(checked.output[checked.output.index("{"):])
    assert result["accuracy"]["metric"] == "top1" and result["accuracy"]["samples"] == len(text_files.labels)
