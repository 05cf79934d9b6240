"""Hugging Face models through optimum's ONNX exporter (dynamic batch and sequence axes, the
input names optimum uses); the exported file is moved to `path`."""
from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
import warnings
from pathlib import Path

import onnx

from sqexport.exporters.onnx_export import check_model
from sqexport.exporters.pooling import add_pooling_output
from sqexport.contracts.errors import ExportError, first_line
from sqexport.contracts.tasks import get_task
from sqexport.models.spec import ModelSpec

__all__ = ["export_hf", "save_tokenizer"]


def save_tokenizer(spec: ModelSpec, outdir: Path) -> list[str]:
    """Ship the tokenizer beside model.onnx: an app (and `sqexport check` on text) needs it."""
    from transformers import AutoTokenizer

    before = set(p.name for p in Path(outdir).iterdir())
    tokenizer = AutoTokenizer.from_pretrained(spec.kind.path, local_files_only=True,
                                              trust_remote_code=spec.kind.trust_remote_code)
    max_length = (spec.preprocessing or {}).get("max_length")
    if isinstance(max_length, int):  # the positions the model has: `sqexport check` tokenizes to at most this
        tokenizer.model_max_length = min(int(tokenizer.model_max_length), max_length)
    tokenizer.save_pretrained(str(outdir))
    return sorted(set(p.name for p in Path(outdir).iterdir()) - before)


def export_hf(spec: ModelSpec, model, path: Path) -> onnx.ModelProto:
    from optimum.exporters.onnx import onnx_export_from_model

    path = Path(path)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".optimum-") as tmp:
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                    _quiet("optimum", "transformers", "torch.onnx"):
                warnings.simplefilter("ignore")
                onnx_export_from_model(model.eval(), tmp, task=get_task(spec.task).hf_task, do_validation=False)
        except Exception as exc:
            raise ExportError(f"optimum export failed: {type(exc).__name__}: {first_line(exc)}") from exc
        shutil.move(str(Path(tmp) / "model.onnx"), path)
    pooling = getattr(spec, "pooling", None)  # a ModelSpec has it; lighter stand-ins (tests) may not
    if pooling is not None and pooling.from_config and "attention_mask" in spec.input_names:
        onnx.save(add_pooling_output(onnx.load(str(path)), pooling), str(path))
    return check_model(path)


@contextlib.contextmanager
def _quiet(*names):
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)
