"""A user's own model end to end through the CLI: `sqexport mypkg.nets:tiny_cnn --input-shape
1x3x32x32 --calib-data imgs/`, a TorchScript file and an ExportedProgram, plus bad input."""
import json
import os

import pytest
import torch


def _ok(result):
    assert result.exit_code == 0, result.output
    return result


def _one_line_error(result, words):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and words in errors[0], result.output
    return errors[0]


def _net(module="tiny_cnn"):
    import sys

    sys.path.insert(0, os.getcwd())  # restored by the user_project fixture
    import mypkg.nets

    return getattr(mypkg.nets, module)()


@pytest.mark.e2e
def test_factory_with_image_folder_end_to_end(user_project, images_factory, run_cli):
    images_factory(user_project / "imgs", ["cat", "dog", "owl"], 4)
    r = _ok(run_cli(["mypkg.nets:tiny_cnn", "--input-shape", "1x3x32x32", "--calib-data", "imgs/"]))
    out = user_project / "sqexport-out" / "mypkg.nets_tiny_cnn"
    files = [f for f in os.listdir(out) if not f.endswith(".png")]  # plots are report.md's
    assert sorted(files) == [".sqexport-manifest.json", "baseline.onnx", "model.onnx", "report.json", "report.md"]
    assert "one data set given" in r.output  # said on the console too
    rep = json.loads((out / "report.json").read_text())
    assert rep["source"] == {"kind": "factory", "ref": "mypkg.nets:tiny_cnn",
                             "input_shapes": {"image": [1, 3, 32, 32]},
                             "graph_capture": {"rebuilt": True, "why": rep["source"]["graph_capture"]["why"]},
                             "task_from": "2-D output: classification (top-1)"}
    # every layer int8, unless the speed check measured the whole model faster with it in FP32
    assert all("speed check" in f["reason"] for f in rep["quantization"]["coverage"]["fp32"])
    kept = rep["quantization"]["speed_check"]["kept_fp32"]
    assert sorted(f["layer"] for f in rep["quantization"]["coverage"]["fp32"]) == sorted(kept)
    calib, evals = rep["data"]["calib"], rep["data"]["eval"]
    # 12 images, every 4th held out; a folder under 64 images gets ceil(64 / 12) = 6 views per image
    assert calib["samples"] == 9 * 6 and evals["samples"] == 3 * 6 and calib["views"] == 6
    assert calib["views_chosen"].startswith("automatic: a folder of 12 images")
    for info in (calib, evals):
        assert info["format"] == "image folder" and info["class_names"] == ["cat", "dog", "owl"]
        assert info["size"] == [32, 32] and info["channels"] == 3 and info["color"] == "RGB"
        assert info["mean"] == "none" and info["std"] == "none" and info["resize"].startswith("bilinear")
        assert info["labels"] == "class subfolder index (sorted names)"
    assert rep["accuracy"]["metric"] == "top1" and "note" not in rep["accuracy"]
    assert rep["quantization"]["quantized_layers"] == 3  # two convs and the head
    md = (out / "report.md").read_text()
    assert "## Data" in md and "| class names | cat, dog, owl | cat, dog, owl |" in md

    # `check` reads the same folder, shaped by the ONNX input (1x3x32x32)
    r = _ok(run_cli(["check", out / "model.onnx", "--baseline", out / "baseline.onnx", "--eval-data", "imgs",
                     "--json"]))
    result = json.loads(r.output[r.output.index("{"):])
    assert result["data_info"]["samples"] == 12 * 6 and result["data_info"]["size"] == [32, 32]  # automatic views
    assert result["accuracy"]["metric"] == "top1"
    _one_line_error(run_cli(["check", out / "model.onnx", "--eval-data", "imgs", "--mean", "1,2"]),
                    "--mean has 2 values")


@pytest.mark.e2e
def test_torchscript_file_with_grayscale_flat_folder(user_project, images_factory, run_cli):
    torch.jit.save(torch.jit.trace(_net("gray_cnn"), torch.rand(2, 1, 16, 16)), "net.pt")
    images_factory(user_project / "calib", ["a", "b"], 3, mode="L")
    images_factory(user_project / "eval", None, 4, mode="RGB", seed=1)  # converted to grayscale
    r = _ok(run_cli(["net.pt", "--input-shape", "1x1x16x16", "--calib-data", "calib", "--eval-data", "eval",
                     "--mean", "0.5", "--std", "0.25", "-o", "out"]))
    rep = json.loads((user_project / "out" / "report.json").read_text())
    assert rep["source"]["kind"] == "TorchScript" and rep["model"] == "net"
    evals = rep["data"]["eval"]
    assert evals["layout"] == "flat" and evals["labels"] == "none" and evals["color"] == "grayscale"
    assert evals["mean"] == [0.5] and evals["std"] == [0.25] and evals["samples"] == 4 * 8  # 8 automatic views
    assert rep["accuracy"]["metric"] == "top1_expected"
    assert rep["accuracy"]["note"].startswith("no labels: top-1 expected under the FP32 model")
    assert "no labels: top-1 expected under the FP32 model" in (user_project / "out" / "report.md").read_text()
    assert "(no labels)" in r.output


@pytest.mark.e2e
def test_exported_program_without_data_uses_seeded_synthetic_inputs(user_project, run_cli):
    ep = torch.export.export(_net(), (torch.rand(2, 3, 16, 16),),
                             dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(ep, "net.pt2")
    r = _ok(run_cli(["net.pt2", "-o", "out", "--seed", "3"]))  # input shape from the program
    assert "NO DATA" in r.output
    rep = json.loads((user_project / "out" / "report.json").read_text())
    assert rep["source"]["kind"] == "ExportedProgram" and rep["source"]["input_shapes"] == {"image": [1, 3, 16, 16]}
    assert rep["data"]["calib"]["source"] == "synthetic" and "seed 3" in rep["data"]["calib"]["distribution"]
    assert "NO DATA" in rep["notes"][0] and rep["accuracy"]["metric"] == "top1_expected"


@pytest.mark.parametrize("args, words", [
    (["mypkg.nets:nope", "--input-shape", "1x3x8x8"], "has no attribute 'nope'"),
    (["mypkg.nets:not_a_module", "--input-shape", "1x3x8x8"], "not a torch.nn.Module"),
    (["mypkg.nets:tiny_cnn", "--input-shape", "1x3x0x8"], "--input-shape '1x3x0x8'"),
    (["mypkg.nets:tiny_cnn", "--input-shape", "img=1x3x8x8"], "unknown input(s) img"),
    (["mypkg.nets:tiny_cnn", "--input-shape", "1x3x8x8", "--calib-data", "imgs", "--mean", "0.5,0.5"],
     "--mean has 2 values"),
    (["mypkg.nets:tiny_cnn", "--input-shape", "1x3x8x8", "--calib-data", "imgs", "--std", "1,1,0"], "> 0"),
    (["mypkg.nets:tiny_cnn", "--input-shape", "1x3x8x8", "--calib-data", "empty"], "no images found"),
    (["mypkg.nets:tiny_cnn", "--input-shape", "1x3x8x8", "--calib-data", "imgs", "--eval-data", "corrupt"],
     "corrupt/bad.jpg"),
    (["digits-cnn", "--input-shape", "1x1x8x8"], "--input-shape gives the example input"),
])
def test_bad_input_is_one_line_exit_2(user_project, images_factory, run_cli, args, words):
    images_factory(user_project / "imgs", ["a"], 2)
    (user_project / "empty").mkdir()
    images_factory(user_project / "corrupt", None, 1)
    (user_project / "corrupt" / "bad.jpg").write_bytes(b"\xff\xd8 truncated")
    _one_line_error(run_cli([*args, "-o", "out"]), words)
    assert not (user_project / "out").exists()


@pytest.mark.e2e
def test_a_user_package_named_models_is_the_users(tmp_path):
    """sqexport installs only `sqexport`: a project's own `models/net.py` is what `models.net:build`
    names, run as a user would (console script, fresh interpreter, the project as current folder)."""
    import subprocess
    import sys

    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "__init__.py").write_text("")
    (tmp_path / "models" / "net.py").write_text(
        "import torch\n\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))\n")
    proc = subprocess.run([sys.executable, "-m", "sqexport", "models.net:build", "--input-shape", "1x6",
                           "--prune", "none", "--threads", "1", "-o", "out"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["source"]["kind"] == "factory" and rep["source"]["ref"] == "models.net:build"
    assert rep["quantization"]["quantized_layers"] == 2
