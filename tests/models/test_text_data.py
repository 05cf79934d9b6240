"""Text data for Hugging Face models: .txt / .jsonl reading, label names, errors, tokenization."""
import json

import numpy as np
import pytest

from sqexport.models.text_data import MAX_LENGTH, read_texts, text_batches, tokenize_batches
from sqexport.contracts.errors import DataError

LABEL2ID = {"neg": 0, "pos": 1}


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------- reading

def test_txt_one_text_per_line(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("  first line  \n\nsecond line\n   \nthird, with ünïcode\n", encoding="utf-8")
    texts, labels = read_texts(path)
    assert texts == ["first line", "second line", "third, with ünïcode"]
    assert labels is None


def test_jsonl_texts_without_labels(tmp_path):
    path = _jsonl(tmp_path / "data.jsonl", [{"text": "a"}, "", {"text": "b", "extra": 1}])
    texts, labels = read_texts(path, LABEL2ID)
    assert texts == ["a", "b"] and labels is None


def test_jsonl_integer_labels(tmp_path):
    path = _jsonl(tmp_path / "data.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": 0}])
    texts, labels = read_texts(path)  # integers need no label2id
    assert texts == ["a", "b"]
    assert labels.dtype == np.int64 and labels.tolist() == [1, 0]


def test_jsonl_label_names_through_label2id(tmp_path):
    path = _jsonl(tmp_path / "data.jsonl", [{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"},
                                             {"text": "c", "label": 1}])  # names and ids may mix
    _, labels = read_texts(path, LABEL2ID)
    assert labels.dtype == np.int64 and labels.tolist() == [1, 0, 1]


@pytest.mark.parametrize("rows, label2id, match", [
    ([{"text": "a"}, "{not json"], None, r"data\.jsonl:2: not valid JSON"),
    ([{"text": "a"}, {"txt": "b"}], None, r'data\.jsonl:2: each line needs a "text"'),
    ([{"text": 3}], None, r'data\.jsonl:1: each line needs a "text"'),
    (['["a", "b"]'], None, r'data\.jsonl:1: each line needs a "text"'),
    ([{"text": "a", "label": 1}, {"text": "b"}], None, "every line or on none"),
    ([{"text": "a"}, {"text": "b", "label": "pos"}], LABEL2ID, "every line or on none"),
    ([{"text": "a", "label": "maybe"}], LABEL2ID, r"unknown label 'maybe'.*neg, pos"),
    ([{"text": "a", "label": "pos"}], None, "unknown label 'pos'"),
    ([{"text": "a", "label": True}], LABEL2ID, "labels must be integers or label names"),
    ([{"text": "a", "label": 0.5}], LABEL2ID, "labels must be integers or label names"),
    ([], None, "no texts"),
], ids=["bad-json", "missing-text", "text-not-string", "not-an-object", "labels-on-some-lines",
        "labels-on-later-lines", "unknown-name", "name-without-label2id", "bool-label", "float-label", "empty"])
def test_bad_jsonl_is_a_data_error(tmp_path, rows, label2id, match):
    path = _jsonl(tmp_path / "data.jsonl", rows)
    with pytest.raises(DataError, match=match) as exc:
        read_texts(path, label2id)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("name, content", [
    ("data.csv", "text,label\nhello,1\n"),
    ("data.json", '{"text": "hello"}\n'),
    ("data", "hello\n"),
], ids=["csv", "json", "no-suffix"])
def test_wrong_suffix_is_a_data_error(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=r"\.txt or \.jsonl"):
        read_texts(path)


def test_unreadable_text_is_a_data_error(tmp_path):
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n\n")
    with pytest.raises(DataError, match="no texts"):
        read_texts(blank)
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00bad utf-8 \xc3\x28")
    with pytest.raises(DataError, match="cannot read"):
        read_texts(binary)
    with pytest.raises(DataError, match="cannot read"):
        read_texts(tmp_path / "missing.txt")


# ---------------------------------------------------------------- tokenization

@pytest.fixture(scope="module")
def tokenizer(tiny_bert):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_bert))


def test_tokenize_batches_sizes_and_padding(tokenizer):
    texts = [f"sentence number {i} " + "word " * i for i in range(20)]
    names = ["input_ids", "attention_mask", "token_type_ids"]
    batches = tokenize_batches(tokenizer, texts, names, batch_size=8)
    assert [len(b["input_ids"]) for b in batches] == [8, 8, 4]
    for b in batches:
        assert list(b) == names and all(v.dtype == np.int64 for v in b.values())
        assert b["input_ids"].shape == b["attention_mask"].shape == b["token_type_ids"].shape
        assert b["attention_mask"].sum(1).max() == b["input_ids"].shape[1]  # padded to the longest
    padded = tokenize_batches(tokenizer, texts[:3], names, pad_to_max=True)
    assert len(padded) == 1 and padded[0]["input_ids"].shape == (3, MAX_LENGTH)


def test_tokenize_batches_truncates_and_keeps_only_named_inputs(tokenizer):
    (batch,) = tokenize_batches(tokenizer, ["word " * 500, "short"], ["input_ids", "attention_mask"])
    assert list(batch) == ["input_ids", "attention_mask"]
    assert batch["input_ids"].shape == (2, MAX_LENGTH)
    assert batch["input_ids"][0, -1] == 102  # [SEP] kept at the end of the truncated text


def test_text_batches_group_by_length_and_keep_labels_with_their_texts(tokenizer):
    # 24 texts of distinct lengths, alternately short and long: in file order every batch of 8
    # pads nearly all its rows to a long text
    words = [n if i % 2 == 0 else 40 - n for i, n in enumerate(range(1, 25))]
    texts = [("word " * n).strip() for n in words]
    labels = np.arange(len(texts))
    names = ["input_ids", "attention_mask"]
    batches, out = text_batches(tokenizer, texts, names, labels, batch_size=8)
    lengths = [int(n) for b in batches for n in b["attention_mask"].sum(1)]
    # a row's length names its text (each text is [CLS] + n words + [SEP]): its label came along
    assert out.tolist() == [words.index(n - 2) for n in lengths]
    assert sorted(out.tolist()) == labels.tolist()
    padded_rows = sum(b["input_ids"].size for b in batches)
    file_order_rows = sum(b["input_ids"].size for b in tokenize_batches(tokenizer, texts, names, batch_size=8))
    assert padded_rows == sum(8 * (max(sorted(words)[i:i + 8]) + 2) for i in range(0, 24, 8)) < file_order_rows
    again, out_again = text_batches(tokenizer, texts, names, labels, batch_size=8)  # same order every run
    assert out_again.tolist() == out.tolist()
    assert all((a["input_ids"] == b["input_ids"]).all() for a, b in zip(again, batches))
    assert text_batches(tokenizer, texts, names, None, batch_size=8)[1] is None
