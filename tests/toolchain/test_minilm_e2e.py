"""The one real model end to end: `sqexport export minilm -o OUT --threads 1` (all-MiniLM-L6-v2,
every default), judged on the held-out eval split of the project corpus. Latency is a benchmark
concern (benchmarks/minilm.py), not asserted here."""
import json
import os
from types import SimpleNamespace

import numpy as np
import onnx
import pytest

from sqexport.models.hf import default_corpus

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


@pytest.fixture(scope="module")
def minilm(run_cli, tmp_path_factory):
    out = tmp_path_factory.mktemp("minilm") / "minilm"
    result = run_cli(["export", "minilm", "-o", out, "--threads", 1])
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").is_file() else None
    return SimpleNamespace(result=result, out=out, report=report)


def test_exit_code_and_files(minilm):
    assert minilm.result.exit_code == 0, minilm.result.output
    assert sorted(os.listdir(minilm.out)) == [".sqexport-manifest.json", "baseline.onnx", "latency_vs_metric.png",
                                              "model.onnx", "report.json", "report.md", "snr.png",
                                              "special_tokens_map.json", "tokenizer.json",
                                              "tokenizer_config.json", "vocab.txt"]  # the tokenizer ships beside model.onnx
    rep = minilm.report
    assert rep["model"] == "minilm" and rep["task"] == "feature-extraction" and rep["passed"] is True


def test_embedding_fidelity_on_the_held_out_split(minilm):
    acc = minilm.report["accuracy"]
    assert acc["metric"] == "cosine"
    assert acc["model"] >= 0.99  # mean cosine of mean-pooled embeddings vs FP32
    assert acc["spearman"] >= 0.99  # pairwise similarities rank the same way
    assert acc["min_cosine"] > 0.95
    _, evals = default_corpus()
    assert len(evals) == 168  # the held-out 2 of every 5 corpus lines


def test_size_and_int8_coverage(minilm, onnx_tools):
    size = minilm.report["size_bytes"]
    assert size["model"] == (minilm.out / "model.onnx").stat().st_size
    assert size["model"] * 3 < size["baseline"]
    q = minilm.report["quantization"]
    assert "embeddings.word_embeddings" in q["int8_embeddings"]
    model = onnx.load(str(minilm.out / "model.onnx"))
    rows = onnx_tools.quantized_weights(model)
    assert len(rows) == q["quantized_layers"] >= 36 - len(q["fallback"])  # 6 layers x 6 Linears
    assert all(r.q.dtype == np.int8 and (r.zero_point == 0).all() for r in rows)


def test_no_pruning_by_default(minilm):
    rep = minilm.report
    assert rep["sparsity"]["overall"] == 0.0
    assert not any(s["name"].startswith("prune.") for s in rep["stages"])
