"""timm architectures as `pkg.module:factory` models, for the zoo tests and benchmark.

`make venv` installs timm and torchvision with --no-deps into their own folder, ZOO_DEPS, not into
the venv's site-packages: transformers imports torchvision whenever it is importable, and plain
`pip install timm` would replace the CPU torch with a CUDA build. Only this module puts that
folder on sys.path, after the two schemas below exist.

timm imports torchvision. The torchvision wheel served for this torch is a CUDA build whose import
registers kernels for two operators its C++ library would define; on the CPU torch that library
does not load, so the import fails ("operator torchvision::nms does not exist"). Defining the two
schemas first lets the Python part import; nothing here calls those operators.

Weights are random (fixed seed: no model hub at run time), and BatchNorm statistics are real:
re-estimated on calibration photo crops, so activations have the ranges a trained network's have.
"""
from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch

__all__ = ["ARCHITECTURES", "ZOO_DEPS", "timm_available", "import_timm", "make_model", "calibration_crops", "evaluation_crops"]

# name in the report -> timm model name
ARCHITECTURES = {
    "resnet18": "resnet18",
    "mobilenetv3_small": "mobilenetv3_small_100",
    "efficientnet_b0": "efficientnet_b0",
    "efficientnet_lite0": "efficientnet_lite0",
    "regnetx_002": "regnetx_002",
    "ghostnet": "ghostnet_100",
    "convnext_atto": "convnext_atto",
    "mobilevit_xxs": "mobilevit_xxs",
    "deit_tiny": "deit_tiny_patch16_224",
    "repvgg_a0": "repvgg_a0",
    "tf_efficientnet_lite0": "tf_efficientnet_lite0",  # "same" padding: Conv2dSame
}
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


ZOO_DEPS = Path(sys.prefix) / "zoo-deps"


def timm_available() -> bool:
    return (ZOO_DEPS / "timm").is_dir() or importlib.util.find_spec("timm") is not None


@functools.lru_cache(maxsize=1)
def import_timm():
    if not _has_schema("torchvision::nms"):
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import_timm.library = lib  # the definitions live as long as this object
    if ZOO_DEPS.is_dir() and str(ZOO_DEPS) not in sys.path:
        sys.path.append(str(ZOO_DEPS))
    import timm
    return timm


def _has_schema(name: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(name, "")
        return True
    except RuntimeError:
        return False


def _crops(names, per_photo: int, seed: int, size: int) -> np.ndarray:
    from sqexport.models.photos import normalize, photo_crops
    return normalize(photo_crops(names, per_photo, seed, size=size), MEAN, STD)


def calibration_crops(per_photo: int = 8, size: int = 224) -> np.ndarray:
    from sqexport.models.photos import CALIB_PHOTOS
    return _crops(CALIB_PHOTOS, per_photo, 0, size)


def evaluation_crops(per_photo: int = 8, size: int = 224) -> np.ndarray:
    from sqexport.models.photos import EVAL_PHOTOS
    return _crops(EVAL_PHOTOS, per_photo, 1, size)


def make_model(arch: str, seed: int = 0, size: int = 224) -> torch.nn.Module:
    timm = import_timm()
    torch.manual_seed(seed)
    model = timm.create_model(ARCHITECTURES.get(arch, arch), pretrained=False)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if norms:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches below
        model.train()
        x = torch.from_numpy(calibration_crops(4, size))
        with torch.no_grad():
            for i in range(0, len(x), 10):
                model(x[i:i + 10])
    return model.eval()


def _factory(arch: str):
    def build() -> torch.nn.Module:
        return make_model(arch)
    build.__name__ = arch
    return build


for _arch in ARCHITECTURES:
    globals()[_arch] = _factory(_arch)


def __getattr__(name: str):
    """`benchmarks._timm:<any timm model name>` as a factory, for architectures beyond the table."""
    if name.startswith("__"):
        raise AttributeError(name)
    return _factory(name)
