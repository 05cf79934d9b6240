"""Issue 20 item 3: a Hugging Face folder that names its own Python code (auto_map) is refused with
one line unless --trust-remote-code is given; nothing of it runs, nothing prompts on stdin, and
transformers is always called with trust_remote_code=False otherwise (model and tokenizer)."""
import json
import os
import shutil
from pathlib import Path

import pytest

from sqexport.contracts.errors import ModelLoadError
from sqexport.models.zoo import load_model

EVIL = "open({marker!r}, 'w').write('folder code ran')\nfrom transformers import BertConfig as EvilConfig\n"


def _hostile(tiny_bert, tmp_path, where: str) -> Path:
    folder = tmp_path / f"evil-{where.split('.')[0]}"
    shutil.copytree(tiny_bert, folder)
    (folder / "evil.py").write_text(EVIL.format(marker=str(tmp_path / "ran")))
    path = folder / where
    data = json.loads(path.read_text())
    data["auto_map"] = ({"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"} if where == "config.json"
                        else {"AutoTokenizer": ["evil.EvilTokenizer", None]})
    path.write_text(json.dumps(data))
    return folder


@pytest.mark.parametrize("where", ["config.json", "tokenizer_config.json"])
def test_remote_code_is_refused_without_the_flag(run_cli, tiny_bert, tmp_path, where):
    folder = _hostile(tiny_bert, tmp_path, where)
    result = run_cli([folder, "-o", tmp_path / "out"], input="y\ny\ny\n")  # an open stdin says yes
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.startswith("Error")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert "--trust-remote-code" in lines[0] and where in lines[0], result.output
    assert not (tmp_path / "ran").exists() and not (tmp_path / "out").exists()
    from transformers.utils import HF_MODULES_CACHE

    assert not list(Path(HF_MODULES_CACHE).glob(f"**/{folder.name}*"))


def test_transformers_is_told_false_or_the_users_true(tiny_bert, tmp_path, monkeypatch):
    import transformers

    seen = []
    for cls in (transformers.AutoTokenizer, transformers.AutoModel):
        original = cls.from_pretrained.__func__

        def spy(klass, *args, _original=original, **kwargs):
            seen.append(kwargs.get("trust_remote_code", "missing"))
            return _original(klass, *args, **kwargs)
        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    load_model(str(tiny_bert))
    assert seen and all(v is False for v in seen), seen
    seen.clear()
    folder = _hostile(tiny_bert, tmp_path, "tokenizer_config.json")
    # the flag lets transformers import the folder's code, which has no EvilTokenizer: a load error
    with pytest.raises(ModelLoadError, match="cannot load the Hugging Face model in .*evil-tokenizer_config: .*EvilTokenizer"):
        load_model(str(folder), trust_remote_code=True)
    assert True in seen


def test_the_flag_is_for_hugging_face_folders_only():
    with pytest.raises(ModelLoadError, match="--trust-remote-code"):
        load_model("digits-cnn", trust_remote_code=True)


def test_check_never_runs_a_tokenizer_folders_code(run_cli, tiny_bert, tmp_path, text_files):
    folder = tmp_path / "out"
    folder.mkdir()
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["input_ids"], ["y"])], "g",
                              [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])],
                              [helper.make_tensor_value_info("y", TensorProto.INT64, ["b", "s"])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(folder / "model.onnx"))
    hostile = _hostile(tiny_bert, tmp_path, "tokenizer_config.json")
    for name in os.listdir(hostile):
        if name.startswith(("tokenizer", "vocab", "special")) or name == "evil.py":
            shutil.copy(hostile / name, folder / name)
    result = run_cli(["check", folder / "model.onnx", "--eval-data", text_files.eval_txt], input="y\n")
    assert result.exit_code == 2 and "never runs it" in result.output, result.output
    assert not (tmp_path / "ran").exists()
