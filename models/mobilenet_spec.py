"""The built-in `mobilenet-v2`: torchvision's ImageNet MobileNetV2 on crops of packaged photos."""
from __future__ import annotations

import numpy as np

from sqexport.models.mobilenet_v2 import IMAGENET_MEAN, IMAGENET_STD, MobileNetV2, load_pretrained
from sqexport.models.photos import CALIB_PHOTOS, EVAL_PHOTOS, normalize, photo_crops
from sqexport.models.spec import ModelSpec

__all__ = ["build_mobilenet_spec", "mobilenet_data", "INPUT_NAME"]

INPUT_NAME = "pixels"
CALIB_PER_PHOTO = 16  # 10 photos -> 160 calibration crops
EVAL_PER_PHOTO = 48  # 7 held-out photos -> 336 evaluation crops
CALIB_SEED, EVAL_SEED = 0, 1
BATCH = 32
# the int8 params `sqexport mobilenet-v2` runs with by default (benchmarks/mobilenet.py measures each
# remedy on and off). Activation ranges are the mean of each calibration crop's own min and max
# (NNCF's default estimator), which clips the rare extremes one crop shows; with bias correction it
# keeps top-1 agreement on the 336 held-out crops at 91.4% and KL at 0.039, against 87.5% / 0.072
# with MSE-shrunk ranges and 66.7% / 0.495 with plain min-max. Fallback stays off: its prediction
# from the calibration crops is pessimistic for this model (it predicts more than the gate where
# the held-out crops stay well inside it), and the depthwise/pointwise layers it returns to FP32
# cost much of the int8 speed-up without improving the held-out metric
# (benchmarks/results/mobilenet.md).
RECIPE_PARAMS = {"observer": "mean-minmax", "bias_correction": True, "fallback": False}


def _batches(x: np.ndarray) -> list[dict]:
    return [{INPUT_NAME: x[i:i + BATCH]} for i in range(0, len(x), BATCH)]


def mobilenet_data() -> tuple[np.ndarray, np.ndarray]:
    """(calibration, evaluation) inputs, (N, 3, 224, 224) float32, ImageNet-normalized."""
    calib = normalize(photo_crops(CALIB_PHOTOS, CALIB_PER_PHOTO, CALIB_SEED), IMAGENET_MEAN, IMAGENET_STD)
    evals = normalize(photo_crops(EVAL_PHOTOS, EVAL_PER_PHOTO, EVAL_SEED), IMAGENET_MEAN, IMAGENET_STD)
    return calib, evals


def build_mobilenet_spec() -> ModelSpec:
    model = load_pretrained()
    calib, evals = mobilenet_data()
    return ModelSpec(
        name="mobilenet-v2",
        model=model,
        task="image-classification",
        input_names=[INPUT_NAME],
        output_names=["logits"],
        example_inputs={INPUT_NAME: evals[:1]},
        calib_batches=_batches(calib),
        eval_batches=_batches(evals),
        dynamic_axes={INPUT_NAME: {0: "batch"}, "logits": {0: "batch"}},
        description=f"{MobileNetV2.__doc__.splitlines()[0]}; crops of photos from scikit-image/scikit-learn",
        default_prune="none",
        quant_defaults=dict(RECIPE_PARAMS),
    )
