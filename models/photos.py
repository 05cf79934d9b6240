"""Real photos that ship inside installed packages, as ImageNet-style calibration and eval crops.

Sources: scikit-image's bundled `skimage.data` images (only those stored in the wheel; several
others need a pooch download and are not used) and scikit-learn's two sample images. The split
is by photo, so no evaluation crop comes from a photo seen during calibration:

- calibration: random resized crops (scale 0.08-1, aspect 3/4-4/3, as in ImageNet training) with
  horizontal flips, seeded;
- evaluation: random resized crops of the held-out photos, with a different seed. Crops of parts of
  a photo are "hard": often no single ImageNet object fills them, so FP32's own top-1 is uncertain
  and int8 noise flips it more easily than on centred object photos.

There are no labels: metrics compare the int8 model with the FP32 model (top-1 / top-5 agreement,
KL of the softmax). Grayscale photos are repeated over three channels.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from sqexport.contracts.errors import DataError

__all__ = ["CALIB_PHOTOS", "EVAL_PHOTOS", "load_photo", "random_resized_crops", "photo_crops", "normalize"]

# name -> loader. Splitting by photo: the cat (chelsea) and the coffee cup stay held out because
# they are the two photos whose FP32 classes are easy to check by hand.
CALIB_PHOTOS = ("astronaut", "rocket", "immunohistochemistry", "hubble_deep_field", "motorcycle",
                "china", "camera", "brick", "grass", "coins")
EVAL_PHOTOS = ("chelsea", "coffee", "flower", "retina", "gravel", "clock", "moon")
SIZE = 224


def _skimage(name: str):
    def load() -> np.ndarray:
        from skimage import data

        img = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
        return img

    return load


def _sklearn(name: str):
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_image

        return load_sample_image(f"{name}.jpg")

    return load


LOADERS = {n: _skimage(n) for n in ("astronaut", "rocket", "immunohistochemistry", "hubble_deep_field",
                                    "motorcycle", "camera", "brick", "grass", "coins", "chelsea", "coffee",
                                    "retina", "gravel", "clock", "moon")}
LOADERS.update({n: _sklearn(n) for n in ("china", "flower")})


def load_photo(name: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB."""
    if name not in LOADERS:
        raise DataError(f"unknown photo '{name}'; known: {', '.join(sorted(LOADERS))}")
    try:
        img = np.asarray(LOADERS[name]())
    except (ImportError, OSError, ValueError) as exc:
        raise DataError(f"photo '{name}' is not available offline: {exc}") from None
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    return np.ascontiguousarray(img[:, :, :3]).astype(np.uint8)


def normalize(crops: np.ndarray, mean, std) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32, ImageNet normalization."""
    x = crops.astype(np.float32) / 255.0
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


@dataclass(frozen=True)
class CropPolicy:
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True


def _crop_box(rng: np.random.Generator, h: int, w: int, policy: CropPolicy) -> tuple[int, int, int, int]:
    """torchvision RandomResizedCrop's box sampling: 10 tries, then the centred full crop."""
    area = h * w
    log_r = np.log(policy.ratio)
    for _ in range(10):
        target = area * rng.uniform(*policy.scale)
        aspect = float(np.exp(rng.uniform(*log_r)))
        cw, ch = int(round(np.sqrt(target * aspect))), int(round(np.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            return top, left, ch, cw
    side = min(h, w)
    return (h - side) // 2, (w - side) // 2, side, side


def random_resized_crops(img: np.ndarray, n: int, rng: np.random.Generator, policy: CropPolicy,
                         size: int = SIZE) -> np.ndarray:
    out = np.empty((n, size, size, 3), np.uint8)
    pil = Image.fromarray(img)
    for i in range(n):
        top, left, ch, cw = _crop_box(rng, img.shape[0], img.shape[1], policy)
        crop = pil.resize((size, size), Image.BILINEAR, box=(left, top, left + cw, top + ch))
        arr = np.asarray(crop)
        if policy.flip and rng.random() < 0.5:
            arr = arr[:, ::-1]
        out[i] = arr
    return out


def photo_crops(names: tuple[str, ...], per_photo: int, seed: int, policy: CropPolicy = CropPolicy(),
                size: int = SIZE) -> np.ndarray:
    """`per_photo` crops of each photo, (N, size, size, 3) uint8; photo i uses seed (seed, i)."""
    parts = [random_resized_crops(load_photo(n), per_photo, np.random.default_rng([seed, i]), policy, size)
             for i, n in enumerate(names)]
    return np.concatenate(parts)
