"""Hugging Face folders: task detection, --task override, mean pooling, the ModelSpec of a tiny BERT."""
import json
import shutil

import numpy as np
import pytest
from transformers import BertForSequenceClassification, BertModel

from sqexport.exporters.export import exporter_for
from sqexport.models.hf import build_hf_spec, default_corpus, detect_task, is_hf_folder, mean_pool
from sqexport.models.text_data import MAX_LENGTH
from sqexport.models.spec import HFFolder
from sqexport.models.zoo import load_model
from sqexport.contracts.errors import ModelLoadError

OPTIMUM_INPUTS = ["input_ids", "attention_mask", "token_type_ids"]


# ---------------------------------------------------------------- task detection

@pytest.mark.parametrize("config, task", [
    ({"architectures": ["BertForSequenceClassification"]}, "sequence-classification"),
    ({"architectures": ["DistilBertForSequenceClassification"]}, "sequence-classification"),
    ({"architectures": ["BertModel"]}, "feature-extraction"),
    ({"architectures": ["BertForMaskedLM"]}, "feature-extraction"),
    ({"architectures": None}, "feature-extraction"),
    ({}, "feature-extraction"),
], ids=["bert-cls", "distilbert-cls", "bert-model", "masked-lm", "null", "missing"])
def test_detect_task_from_architectures(config, task):
    assert detect_task(config) == task


def test_detected_task_of_the_tiny_folders(tiny_bert, tiny_bert_cls):
    assert detect_task(json.loads((tiny_bert / "config.json").read_text())) == "feature-extraction"
    assert detect_task(json.loads((tiny_bert_cls / "config.json").read_text())) == "sequence-classification"


def test_is_hf_folder(tiny_bert, tmp_path):
    assert is_hf_folder(tiny_bert)
    assert not is_hf_folder(tmp_path)  # no config.json
    assert not is_hf_folder(tiny_bert / "config.json")  # a file, not a folder
    assert not is_hf_folder(tmp_path / "missing")


# ---------------------------------------------------------------- mean pooling

def test_mean_pool_by_hand():
    hidden = np.array([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]],
                       [[-2.0, 6.0], [50.0, 50.0], [50.0, 50.0]]], np.float32)
    batch = {"attention_mask": np.array([[1, 1, 0], [1, 0, 0]], np.int64)}
    pooled = mean_pool([hidden], batch)
    # row 0: mean of the first two tokens; row 1: the first token only (padding ignored)
    np.testing.assert_allclose(pooled, [[2.0, 3.0], [-2.0, 6.0]])
    assert pooled.dtype == np.float32 and pooled.shape == (2, 2)


def test_mean_pool_full_mask_is_the_plain_mean_and_empty_mask_is_zero():
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(3, 5, 4)).astype(np.float32)
    full = mean_pool([hidden], {"attention_mask": np.ones((3, 5), np.int64)})
    np.testing.assert_allclose(full, hidden.mean(1), rtol=1e-6, atol=1e-6)
    empty = mean_pool([hidden], {"attention_mask": np.zeros((3, 5), np.int64)})
    assert np.isfinite(empty).all() and (empty == 0).all()


# ---------------------------------------------------------------- build_hf_spec

def test_spec_of_the_tiny_bert(tiny_bert, tiny_bert_spec):
    spec = tiny_bert_spec
    assert spec.name == tiny_bert.name and spec.kind == HFFolder(str(tiny_bert))
    assert spec.task == "feature-extraction" and isinstance(spec.model, BertModel)
    assert not spec.model.training
    assert spec.input_names == OPTIMUM_INPUTS  # optimum's names, in optimum's order
    assert spec.output_names == ["last_hidden_state"]
    assert exporter_for(spec).name == "optimum"
    assert spec.default_prune == "none"  # no unstructured pruning by default for transformers
    assert spec.prune_prefix == "encoder."
    assert spec.postprocess is mean_pool
    assert spec.eval_labels is None and spec.load_data is not None


def test_example_input_is_one_text_padded_to_max_length(tiny_bert_spec):
    ex = tiny_bert_spec.example_inputs
    assert list(ex) == OPTIMUM_INPUTS
    for name in OPTIMUM_INPUTS:
        assert ex[name].shape == (1, MAX_LENGTH) == (1, 128) and ex[name].dtype == np.int64
    mask = ex["attention_mask"][0]
    n = int(mask.sum())
    assert 2 < n < MAX_LENGTH and (mask[:n] == 1).all() and (mask[n:] == 0).all()  # real tokens, then padding
    assert (ex["input_ids"][0, n:] == 0).all()  # [PAD] is id 0 in the MiniLM vocabulary
    assert ex["input_ids"][0, 0] == 101 and ex["input_ids"][0, n - 1] == 102  # [CLS] ... [SEP]


def test_default_data_is_the_project_corpus_split(tiny_bert_spec):
    calib, evals = default_corpus()
    assert len(calib) + len(evals) == 420 and len(evals) == 2 * 420 // 5
    assert not set(calib) & set(evals)  # the eval split is held out
    spec = tiny_bert_spec
    assert sum(len(b["input_ids"]) for b in spec.calib_batches) == len(calib)
    assert sum(len(b["input_ids"]) for b in spec.eval_batches) == len(evals)
    for batch in spec.calib_batches + spec.eval_batches:
        assert list(batch) == OPTIMUM_INPUTS and len(batch["input_ids"]) <= 16
        # padded to the longest text of the batch, not to 128
        assert batch["attention_mask"].sum(1).max() == batch["input_ids"].shape[1]


def test_spec_runs_in_torch(tiny_bert_spec):
    batch = tiny_bert_spec.eval_batches[0]
    (hidden,) = tiny_bert_spec.torch_outputs(tiny_bert_spec.model, batch)
    assert hidden.shape == batch["input_ids"].shape + (32,)
    assert tiny_bert_spec.postprocess([hidden], batch).shape == (len(batch["input_ids"]), 32)


def test_classifier_spec(tiny_bert_cls, text_files):
    spec = build_hf_spec(tiny_bert_cls)
    assert spec.task == "sequence-classification" and isinstance(spec.model, BertForSequenceClassification)
    assert spec.output_names == ["logits"] and spec.default_prune == "none"
    assert spec.prune_prefix == "bert.encoder."  # the pooler and the classifier head are not pruned
    batches, labels = spec.load_data(text_files.eval_jsonl)  # label names through the config's label2id
    assert labels.tolist() == _file_labels_in_batch_order(tiny_bert_cls, text_files, batches)
    logits = spec.postprocess(spec.torch_outputs(spec.model, batches[0]), batches[0])
    assert logits.shape == (16, 2)


def test_task_override(tiny_bert, tiny_bert_cls):
    as_cls = build_hf_spec(tiny_bert, task="sequence-classification")
    assert as_cls.task == "sequence-classification" and isinstance(as_cls.model, BertForSequenceClassification)
    assert as_cls.output_names == ["logits"]
    as_encoder = load_model(str(tiny_bert_cls), "feature-extraction")
    assert as_encoder.task == "feature-extraction" and isinstance(as_encoder.model, BertModel)
    assert as_encoder.output_names == ["last_hidden_state"] and as_encoder.postprocess is mean_pool
    assert load_model(str(tiny_bert_cls)).task == "sequence-classification"  # no override: detected


def test_load_model_resolves_a_folder(tiny_bert):
    spec = load_model(str(tiny_bert))
    assert exporter_for(spec).name == "optimum" and spec.name == "tiny-bert"


@pytest.mark.parametrize("make, words", [
    (lambda d: (d / "config.json").write_text("{not json"), "config.json is not valid JSON"),
    (lambda d: (d / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]})),
     "no tokenizer files in "),
], ids=["bad-config", "no-weights"])
def test_broken_folder_is_a_model_load_error(tmp_path, make, words):
    make(tmp_path)
    with pytest.raises(ModelLoadError, match=words) as exc:
        build_hf_spec(tmp_path)
    assert "\n" not in str(exc.value)


def test_label_names_map_through_id2label_when_label2id_is_missing(tiny_bert_cls, text_files, tmp_path):
    """transformers writes `"label2id": null` when a config is built with id2label alone
    (BertConfig(id2label={0: "neg", 1: "pos"})); the label names are still known."""
    folder = tmp_path / "id2label-only"
    shutil.copytree(tiny_bert_cls, folder)
    config = json.loads((folder / "config.json").read_text())
    config["label2id"] = None
    (folder / "config.json").write_text(json.dumps(config))
    spec = build_hf_spec(folder)
    batches, labels = spec.load_data(text_files.eval_jsonl)
    assert labels.tolist() == _file_labels_in_batch_order(folder, text_files, batches)


def _file_labels_in_batch_order(folder, text_files, batches) -> list[int]:
    """eval.jsonl's label ids in the order of the batches' rows, found by each row's tokens:
    batches group texts by length, and every label must still go with its own text."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    label_of = {tuple(tokenizer(t)["input_ids"]): {"neg": 0, "pos": 1}[lab]
                for t, lab in zip(text_files.sentences, text_files.labels)}
    rows = [tuple(ids[m.astype(bool)]) for b in batches for ids, m in zip(b["input_ids"], b["attention_mask"])]
    assert len(label_of) == len(rows) == len(text_files.sentences)
    return [label_of[r] for r in rows]


def test_task_override_does_not_apply_to_the_builtin_minilm():
    with pytest.raises(ModelLoadError, match="does not apply"):
        load_model("minilm", "sequence-classification")
    assert load_model("minilm", "feature-extraction").task == "feature-extraction"


def test_embedding_models_recover_on_extra_text_that_eval_never_sees(tiny_bert_spec, tiny_bert_cls):
    from sqexport.models.hf import RECOVERY_CORPUS

    batches, labels = tiny_bert_spec.recover_data()
    extra = [t.strip() for t in RECOVERY_CORPUS.read_text(encoding="utf-8").splitlines() if t.strip()]
    assert labels is None and sum(len(b["input_ids"]) for b in batches) == len(extra) >= 150
    calib, evals = default_corpus()
    assert not set(extra) & set(evals) and not set(extra) & set(calib)
    assert "recover" in tiny_bert_spec.data_info
    assert build_hf_spec(tiny_bert_cls).recover_data is None  # classifiers keep their labeled split
