"""Image folders as --calib-data / --eval-data: one subfolder per class, or flat without labels.

Each image is read with Pillow, converted to the model's channels (1: grayscale "L", 3: "RGB"),
scaled to [0, 1] (pixel / 255), resized to H x W with Pillow's bilinear filter on the float values
(no rounding back to 8 bits), then normalized with --mean/--std when given. Labels are the index
of the class subfolder in sorted name order. Every choice is recorded for the report.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from sqexport.contracts.errors import ConfigError, DataError

__all__ = ["IMAGE_SUFFIXES", "ImagePrep", "VIEW_POLICY", "parse_floats", "parse_size", "is_image_folder",
           "load_image_folder", "preprocess_image", "image_views", "auto_views"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
RESIZE = "bilinear (Pillow, on float pixels in [0, 1])"
MODES = {1: "L", 3: "RGB"}


@dataclass(frozen=True)
class ImagePrep:
    """--image-size (H, W), --mean, --std; None = not given."""

    size: tuple[int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    # --views: deterministic views per image (the whole image, then crops and flips, seeded), so a
    # folder of a few photos still gives an evaluation of more than a handful of samples; None =
    # chosen by the folder's size (auto_views)
    views: int | None = None
    seed: int = 0

    @property
    def given(self) -> bool:
        return any(v is not None for v in (self.size, self.mean, self.std)) or (self.views or 1) > 1


SMALL_FOLDER_SAMPLES = 64  # a folder of fewer images gets views until it gives about this many samples
MAX_AUTO_VIEWS = 8


def auto_views(images: int) -> int:
    """Views per image when --views is not given: 1 for a folder of 64 images or more; fewer
    images get up to 8 views each (8 photos: 8 views, 64 samples). Calibration then sees crops and
    flips, not only 6 whole photos, and the held-out images are scored on several views each."""
    if images <= 0 or images >= SMALL_FOLDER_SAMPLES:
        return 1
    return min(MAX_AUTO_VIEWS, -(-SMALL_FOLDER_SAMPLES // images))


def parse_floats(option: str, text: str | None) -> tuple[float, ...] | None:
    """`0.485,0.456,0.406` -> floats; --std values must be > 0."""
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"{option} '{text}': give comma-separated numbers, one per channel "
                          "(e.g. 0.485,0.456,0.406)") from None
    if not all(np.isfinite(values)):
        raise ConfigError(f"{option} '{text}': values must be finite")
    if option == "--std" and min(values) <= 0:
        raise ConfigError(f"--std '{text}': every value must be > 0")
    return values


def parse_size(text: str | None) -> tuple[int, int] | None:
    """`224x224` (H x W) or `224` (square)."""
    if text is None:
        return None
    parts = text.lower().split("x")
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise ConfigError(f"--image-size '{text}': give HxW with positive integers (e.g. 224x224)")
    return int(parts[0]), int(parts[1])


def is_image_folder(path: Path) -> bool:
    return Path(path).is_dir()


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and all(_visible(q) for q in p.relative_to(folder).parents if q.name) and _visible(p))


def _scan(root: Path) -> tuple[list[Path], np.ndarray | None, list[str]]:
    """Image files, their labels (None for a flat folder) and the class names."""
    classes = sorted(p for p in root.iterdir() if p.is_dir() and _visible(p))
    loose = [p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and _visible(p)]
    if classes and loose:
        raise DataError(f"{root}: holds both class subfolders and loose images ({loose[0].name}); use one "
                        "subfolder per class, or a flat folder of images without labels")
    if not classes:
        if not loose:
            raise DataError(f"{root}: no images found (PNG, JPEG or BMP)")
        return sorted(loose), None, []
    files, labels = [], []
    for index, folder in enumerate(classes):
        found = _images_in(folder)
        if not found:
            raise DataError(f"{folder}: class folder holds no images (PNG, JPEG or BMP)")
        files += found
        labels += [index] * len(found)
    return files, np.asarray(labels, np.int64), [c.name for c in classes]


VIEW_POLICY = ("view 0: the whole image; view k >= 1: a crop of 50-100% of the area, aspect 3/4-4/3, at a "
               "position drawn with seed (--seed, image index, k), mirrored when k is odd")


def _read_pixels(path: Path, channels: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert(MODES[channels])
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read image {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") \
            from None
    pixels = np.asarray(img, np.float32) / 255.0
    return pixels[:, :, None] if pixels.ndim == 2 else pixels


def _view_box(rng: np.random.Generator, h: int, w: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a crop covering 50-100% of the image."""
    area = h * w * rng.uniform(0.5, 1.0)
    aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
    cw = int(min(w, max(1, round((area * aspect) ** 0.5))))
    ch = int(min(h, max(1, round((area / aspect) ** 0.5))))
    left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return left, top, left + cw, top + ch


def image_views(path: Path, channels: int, size: tuple[int, int], mean, std, views: int = 1,
                seed: int = 0, index: int = 0) -> np.ndarray:
    """`views` renderings of one image -> float32 (views, C, H, W) (VIEW_POLICY)."""
    pixels = _read_pixels(path, channels)
    out = []
    for k in range(views):
        if k == 0:
            out.append(_render(pixels, size, mean, std))
            continue
        left, top, right, bottom = _view_box(np.random.default_rng([seed, index, k]), *pixels.shape[:2])
        crop = pixels[top:bottom, left:right]
        out.append(_render(crop[:, ::-1] if k % 2 else crop, size, mean, std))
    return np.stack(out)


def preprocess_image(path: Path, channels: int, size: tuple[int, int],
                     mean: tuple[float, ...] | None, std: tuple[float, ...] | None) -> np.ndarray:
    """One image -> float32 (C, H, W)."""
    return _render(_read_pixels(path, channels), size, mean, std)


def _render(pixels: np.ndarray, size: tuple[int, int], mean, std) -> np.ndarray:
    from PIL import Image

    h, w = size
    planes = [np.asarray(Image.fromarray(np.ascontiguousarray(pixels[:, :, c]))
                         .resize((w, h), Image.BILINEAR), np.float32) for c in range(pixels.shape[2])]
    out = np.stack(planes)
    if mean is not None:
        out -= np.asarray(mean, np.float32)[:, None, None]
    if std is not None:
        out /= np.asarray(std, np.float32)[:, None, None]
    return out


def _per_channel(prep: ImagePrep, channels: int) -> ImagePrep:
    """`prep` with --mean / --std given per channel: one value stands for every channel (`--mean 0.5`,
    as timm's TensorFlow ports are usually described); otherwise one value per channel."""
    if channels not in MODES:
        raise DataError(f"an image folder gives 1 (grayscale) or 3 (RGB) channels; the model's input has {channels}")
    given = {}
    for option, key in (("--mean", "mean"), ("--std", "std")):
        values = getattr(prep, key)
        if values is not None and len(values) == 1:
            given[key] = tuple(values) * channels
        elif values is not None and len(values) != channels:
            raise ConfigError(f"{option} has {len(values)} values; the model's input has {channels} channel(s): "
                              "give one value per channel, or one for all")
    return replace(prep, **given)


def load_image_folder(root: Path, input_shape: tuple,
                      prep: ImagePrep = ImagePrep()) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """(images (N, C, H, W) float32, labels or None, info for the report). `input_shape` is the
    model's per-sample (C, H, W); a None H/W (dynamic) needs --image-size."""
    root = Path(root)
    if len(input_shape) != 3:
        raise DataError(f"an image folder needs a model input of shape (N, C, H, W); this one takes "
                        f"(N, {', '.join('?' if d is None else str(d) for d in input_shape)})")
    channels, h, w = input_shape
    if channels is None:
        raise DataError("the model's channel dimension is dynamic: an image folder cannot tell 1 from 3 channels")
    prep = _per_channel(prep, channels)
    size = prep.size or (h, w)
    if None in size:
        raise ConfigError("the model's height/width are dynamic: give --image-size HxW")
    if (h, w) != (None, None) and any(m is not None and m != s for m, s in zip((h, w), size)):
        raise ConfigError(f"--image-size {size[0]}x{size[1]} differs from the model's input {h}x{w}")
    files, labels, classes = _scan(root)
    views = max(1, prep.views) if prep.views is not None else auto_views(len(files))
    images = np.concatenate([image_views(f, channels, size, prep.mean, prep.std, views, prep.seed, i)
                             for i, f in enumerate(files)])
    if labels is not None and views > 1:
        labels = np.repeat(labels, views)  # an image's views sit together: image-major order
    info = {"source": str(root), "format": "image folder", "samples": len(files) * views,
            "layout": "one subfolder per class" if classes else "flat",
            "labels": "class subfolder index (sorted names)" if classes else "none",
            "class_names": classes, "size": list(size), "resize": RESIZE, "channels": channels,
            "color": "grayscale" if channels == 1 else "RGB", "scale": "pixel / 255 -> [0, 1]",
            "mean": list(prep.mean) if prep.mean is not None else "none",
            "std": list(prep.std) if prep.std is not None else "none"}
    if views > 1:
        info.update(images=len(files), views=views, view_policy=VIEW_POLICY,
                    views_chosen="--views" if prep.views is not None else
                    f"automatic: a folder of {len(files)} images (< {SMALL_FOLDER_SAMPLES}) gets {views} views each")
    return images, labels, info
