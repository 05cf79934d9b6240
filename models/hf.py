"""Hugging Face model folders (config.json + weights + tokenizer), loaded offline."""
from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

from sqexport.contracts.errors import ModelLoadError, first_line
from sqexport.contracts.files import first_special_file
from sqexport.contracts.pooling import read_pooling
from sqexport.contracts.tasks import get_task, hf_task_names, mean_pool
from sqexport.models.remote_code import remote_code_files
from sqexport.models.spec import HFFolder, ModelSpec
from sqexport.models.text_data import MAX_LENGTH, read_texts, text_batches, tokenize_batches

__all__ = ["is_hf_folder", "build_hf_spec", "detect_task", "default_corpus", "mean_pool"]

CORPUS = Path(__file__).parent / "corpus" / "sentences.txt"
# more text written for this project, used only by recovery (distillation) of embedding models:
# never evaluated on, so the held-out split of CORPUS stays held out
RECOVERY_CORPUS = Path(__file__).parent / "corpus" / "recovery.txt"
# what a tokenizer can be saved as (fast tokenizer, WordPiece, BPE, SentencePiece)
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model", "merges.txt", "source.spm")


def is_hf_folder(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def detect_task(config: dict) -> str:
    """The registered task whose transformers head the config's architecture names
    (BertForSequenceClassification -> AutoModelForSequenceClassification); a bare encoder
    (BertModel, or no architectures) is the task loaded with AutoModel."""
    archs = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    tasks = [get_task(n) for n in hf_task_names()]
    for task in tasks:
        suffix = task.hf_head.removeprefix("AutoModel")
        if suffix and any(a.endswith(suffix) for a in archs):
            return task.name
    return next(t.name for t in tasks if t.hf_head == "AutoModel")


def default_corpus() -> tuple[list[str], list[str]]:
    """The repo's own corpus, split deterministically: 2 of every 5 lines are held out for eval."""
    lines = [t.strip() for t in CORPUS.read_text(encoding="utf-8").splitlines() if t.strip()]
    calib = [t for i, t in enumerate(lines) if i % 5 not in (1, 3)]
    evals = [t for i, t in enumerate(lines) if i % 5 in (1, 3)]
    return calib, evals


def _encoder_prefix(model) -> str:
    for name, _ in model.named_modules():
        if name == "encoder" or name.endswith(".encoder"):
            return name + "."
    return ""


def _read_config(folder: Path) -> dict:
    """config.json as a mapping, with `architectures` a list of names (transformers assumes both)."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except OSError as exc:
        raise ModelLoadError(f"{folder}/config.json is unreadable: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ModelLoadError(f"{folder}/config.json is not UTF-8 text") from None
    except ValueError as exc:
        raise ModelLoadError(f"{folder}/config.json is not valid JSON: {first_line(exc)}") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{folder}/config.json must hold a JSON object, got a {type(config).__name__}")
    archs = config.get("architectures")
    if archs is not None and (not isinstance(archs, list) or not all(isinstance(a, str) for a in archs)):
        raise ModelLoadError(f"{folder}/config.json: 'architectures' must be a list of class names, got {archs!r}")
    if not isinstance(config.get("model_type", ""), str):
        raise ModelLoadError(f"{folder}/config.json: 'model_type' must be a string")
    return config


def _without_sklearn_in_transformers() -> None:
    """transformers imports scikit-learn (1 s of a ~5 s start) only to tune assisted generation
    (generation/candidate_generator.py, roc_curve), which loading, exporting and calibrating never
    do: tell it scikit-learn is absent before its model classes load. A transformers without that
    flag is left alone; code that imports scikit-learn itself (the digits models) is unaffected."""
    import sys

    if "transformers.generation.candidate_generator" in sys.modules:
        return  # already imported with it: nothing to save
    from transformers.utils import import_utils

    if isinstance(getattr(import_utils, "_sklearn_available", None), bool):
        import_utils._sklearn_available = False


def sequence_length(config, tokenizer) -> int:
    """Tokens per text: MAX_LENGTH, or fewer where the model has fewer positions (a small model
    trained with max_position_embeddings 64) or its tokenizer says so. RoBERTa-style models number
    positions from pad_token_id + 1, so that many of their table's rows are never a position."""
    limit = MAX_LENGTH
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        if getattr(config, "model_type", "") in ("roberta", "xlm-roberta", "camembert", "longformer", "mpnet"):
            positions -= int(getattr(config, "pad_token_id", 1) or 0) + 1
        limit = min(limit, max(positions, 2))
    declared = getattr(tokenizer, "model_max_length", None)
    if isinstance(declared, int) and 2 <= declared < limit:
        limit = declared
    return limit


def build_hf_spec(folder: Path, name: str | None = None, task: str | None = None,
                  trust_remote_code: bool = False) -> ModelSpec:
    """`trust_remote_code`: the user's explicit --trust-remote-code; without it a folder whose
    config or tokenizer names its own Python code (auto_map) is refused before transformers sees
    it, and transformers is told False (never None: None makes it prompt on stdin)."""
    folder = Path(folder)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    special = first_special_file(folder)
    if special:
        raise ModelLoadError(f"{special}; sqexport reads regular files only")
    config = _read_config(folder)
    asks = remote_code_files(folder, config)
    if asks and not trust_remote_code:
        raise ModelLoadError(f"{folder} asks to run its own Python code ('auto_map' in {asks[0]}); sqexport "
                             "never runs a model folder's code unless you pass --trust-remote-code")
    task = task or detect_task(config)
    info = get_task(task)
    if info.hf_head is None:
        raise ModelLoadError(f"a Hugging Face folder cannot be loaded as '{task}'")
    try:
        _without_sklearn_in_transformers()
        import transformers
        from transformers import AutoTokenizer

        cls = getattr(transformers, info.hf_head)
        model = cls.from_pretrained(str(folder), local_files_only=True, trust_remote_code=trust_remote_code).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True,
                                                  trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises OSError/ValueError/KeyError for broken folders
        if not any((folder / f).is_file() for f in TOKENIZER_FILES):
            raise ModelLoadError(f"no tokenizer files in {folder} ({' / '.join(TOKENIZER_FILES[:4])} ...); "
                                 "save the tokenizer next to the model (tokenizer.save_pretrained)") from None
        raise ModelLoadError(f"cannot load the Hugging Face model in {folder}: "
                             f"{first_line(exc)}") from None
    # what the tokenizer produces and the model's forward accepts (DistilBERT takes no token_type_ids)
    accepted = inspect.signature(model.forward).parameters
    input_names = [n for n in ("input_ids", "attention_mask", "token_type_ids")
                   if n in accepted and (n in tokenizer.model_input_names or n == "input_ids")]
    output_names = [info.hf_output]
    calib, evals = default_corpus()
    max_length = sequence_length(model.config, tokenizer)
    # transformers may save id2label alone (label2id null): invert it so label names still map
    id2label = getattr(model.config, "id2label", None) or {}
    label2id = getattr(model.config, "label2id", None) or {str(v): int(k) for k, v in id2label.items()}

    def load_data(path: Path):
        texts, labels = read_texts(path, label2id)
        return text_batches(tokenizer, texts, input_names, labels, max_length=max_length)

    def recovery_texts():
        texts, _ = read_texts(RECOVERY_CORPUS)
        return tokenize_batches(tokenizer, texts, input_names, max_length=max_length), None

    pooling = read_pooling(folder) if info.output == "embeddings" else None
    example = tokenize_batches(tokenizer, evals[:1], input_names, max_length=max_length, pad_to_max=True)[0]
    return ModelSpec(
        name=name or folder.name,
        model=model,
        task=task,
        input_names=input_names,
        output_names=output_names,
        example_inputs=example,
        calib_batches=text_batches(tokenizer, calib, input_names, max_length=max_length)[0],
        eval_batches=text_batches(tokenizer, evals, input_names, max_length=max_length)[0],
        eval_labels=None,
        postprocess=pooling if pooling is not None and pooling.from_config else info.postprocess,
        pooling=pooling,
        kind=HFFolder(str(folder), trust_remote_code=trust_remote_code),
        description=f"{config.get('model_type', '?')} ({task})",
        prune_prefix=_encoder_prefix(model),
        default_prune="none",
        load_data=load_data,
        # embedding models distill without labels, so any English text is fair training data;
        # classifiers recover on their labeled calibration split alone
        recover_data=recovery_texts if info.output == "embeddings" else None,
        data_info={"calib": {"source": f"built-in corpus {CORPUS.name}, 3 of every 5 lines", "samples": len(calib),
                             "labels": "none"},
                   "eval": {"source": f"built-in corpus {CORPUS.name}, lines i % 5 in (1, 3)", "samples": len(evals),
                            "labels": "none"},
                   **({"recover": {"source": f"the calibration split + built-in corpus {RECOVERY_CORPUS.name}",
                                   "labels": "none"}} if info.output == "embeddings" else {})},
        preprocessing={"type": "text", "tokenizer": type(tokenizer).__name__, "max_length": max_length,
                       "padding": "max_length (pad id 0, attention_mask 0)", "truncation": True,
                       "pooling": "mean of last_hidden_state over attention_mask" if task == "feature-extraction"
                       else None},
        labels=[id2label[k] for k in sorted(id2label, key=int)] if task == "sequence-classification" and id2label
        else None,
    )


