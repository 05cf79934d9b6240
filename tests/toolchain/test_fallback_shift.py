"""Calibrated on one corpus, evaluated on another: with a gate at half the plain int8 drop, the
fallback tries up to its hard cap and the tiny encoder still misses the gate on the evaluation
texts, so it fails honestly (exit 1, full report) rather than claiming a pass."""
import json

import pytest

pytestmark = pytest.mark.e2e

# Everyday sentences for calibration (the tests' shared SENTENCES), and for evaluation a corpus
# of another kind: machine logs, part numbers and shouted headlines (written for this test).
SHIFTED = [
    "ERROR 0x3F2A: disk /dev/sdb1 reported 4096 bad sectors at 03:14:07 UTC",
    "WARN pool-7 thread 12 waited 15000 ms for lock #88 (timeout=30000)",
    "PART NO. 77-4410-B2 REV C QTY 250 UNIT PRICE 0.0475 EUR",
    "BREAKING: MARKETS PLUNGE 9% AS CENTRAL BANK RAISES RATES TO 7.25%",
    "kernel: [ 8812.331] eth0: link up, 10000 Mbps, full duplex, lpa 0x45E1",
    "GET /api/v2/orders?limit=500&offset=12500 HTTP/1.1 200 88213 bytes 412ms",
    "SKU 90210-XL-BLK backordered; ETA 2031-04-17; supplier code ZX-19",
    "FLASH FLOOD WARNING IN EFFECT UNTIL 11:45 PM FOR COUNTIES 12, 14 AND 19",
    "checksum mismatch: expected 9f86d081884c7d65 got 2c26b46b68ffc68f",
    "INFO replica 3/5 promoted to leader at term 8841 after 2.7 s election",
    "LOT 44B: 1,200 UNITS @ $3.99 = $4,788.00 + TAX 8.875% = $5,212.94",
    "segfault at 0000000000000018 ip 00007f3a2c1d9e4b sp 00007ffd9e2b7c80",
    "RECORD HEAT: 47.3 C MEASURED AT STATION 0071 ON 2029-07-22",
    "retrying upload chunk 118/640 (attempt 4 of 5) backoff=8s",
    "ORDER #A-558201 SHIPPED VIA FREIGHT 3 PALLETS 1,870 KG TOTAL",
    "cpu0: temperature above threshold, cpu clock throttled (total events = 2291)",
]


def _export(run_cli, out, folder, calib, evals, *args):
    result = run_cli(["export", folder, "--calib-data", calib, "--eval-data", evals, "--threads", 1, "-o", out, *args])
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").is_file() else None
    return result, report


@pytest.fixture(scope="module")
def corpora(tmp_path_factory, text_files):
    d = tmp_path_factory.mktemp("shift")
    (d / "shifted.txt").write_text("\n".join(SHIFTED) + "\n", encoding="utf-8")
    return text_files.calib_txt, d / "shifted.txt"


def test_shifted_eval_fails_honestly_after_the_fallback_tried(run_cli, tiny_bert, corpora, tmp_path):
    calib, shifted = corpora
    # the int8 model's drop on the shifted texts without any fallback ...
    _, plain = _export(run_cli, tmp_path / "plain", tiny_bert, calib, shifted, "--max-accuracy-drop", 1)
    assert plain["quantization"]["fallback"] == []
    drop = plain["accuracy"]["drop"]
    assert drop > 0
    # ... then a gate at half of it: the fallback has to act, judged on texts it never scored
    limit = drop / 2
    result, rep = _export(run_cli, tmp_path / "gated", tiny_bert, calib, shifted, "--max-accuracy-drop", limit)
    q = rep["quantization"]
    pred = q["prediction"]["before_fallback"]
    assert pred["shift_factor"] >= 1.0 and pred["samples"] == 20
    assert pred["predicted"] >= pred["calib_mean"]  # margins only ever add
    assert q["predicted_drop_trace"][0] > limit  # it saw that the plain model would fail
    # the drop does not halve before the hard cap (half the layers): exit 1, the report written
    assert result.exit_code == 1 and "gate failed: accuracy_drop" in result.output, result.output
    assert rep["passed"] is False and rep["accuracy"]["drop"] > limit
    cap = q["fallback_cap"]
    assert cap["raised"] and not cap["holds"] and cap["used"] == cap["hard_max_layers"] == len(q["fallback"]) > 0
    assert rep["accuracy"]["drop"] < drop  # the fallback still moved it the right way


    # the shift factor (FP32 activation statistics only) sees the other corpus: 1 when the
    # evaluation texts are the calibration texts themselves, more for the shifted ones
    _, same = _export(run_cli, tmp_path / "same", tiny_bert, calib, calib, "--max-accuracy-drop", 1)
    f_same = same["quantization"]["prediction"]["before_fallback"]["shift_factor"]
    f_other = plain["quantization"]["prediction"]["before_fallback"]["shift_factor"]
    assert f_same == pytest.approx(1.0, abs=1e-6) and f_other > f_same
