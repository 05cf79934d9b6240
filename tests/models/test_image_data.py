"""Image folders: layout, labels, preprocessing numbers checked by hand, and clean errors."""
import numpy as np
import pytest
from PIL import Image

from sqexport.contracts.errors import ConfigError, DataError
from sqexport.models.image_data import (
    ImagePrep, auto_views, load_image_folder, parse_floats, parse_size, preprocess_image,
)


def _save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, np.uint8)).save(path)
    return path


def test_pixels_scale_to_unit_range_and_resize_bilinear(tmp_path):
    # a 1x2 gray image [0, 255] resized to 1x4: Pillow's bilinear on half-pixel centres gives
    # [a, 3a/4 + b/4, a/4 + 3b/4, b] = [0, 0.25, 0.75, 1] (float values, no 8-bit rounding)
    path = _save(tmp_path / "a.png", [[0, 255]])
    out = preprocess_image(path, 1, (1, 4), None, None)
    assert out.dtype == np.float32 and out.shape == (1, 1, 4)
    np.testing.assert_allclose(out[0, 0], [0.0, 0.25, 0.75, 1.0], atol=1e-6)


def test_normalization_is_per_channel_mean_std(tmp_path):
    # 2x2 RGB, no resize; (x/255 - mean) / std per channel
    rgb = np.array([[[255, 0, 51], [0, 255, 102]], [[255, 255, 255], [0, 0, 0]]], np.uint8)
    path = _save(tmp_path / "b.png", rgb)
    mean, std = (0.5, 0.25, 0.0), (0.5, 0.25, 0.2)
    out = preprocess_image(path, 3, (2, 2), mean, std)
    want = (rgb.transpose(2, 0, 1) / 255.0 - np.array(mean)[:, None, None]) / np.array(std)[:, None, None]
    np.testing.assert_allclose(out, want, atol=1e-6)
    assert out[0, 0, 0] == pytest.approx(1.0) and out[2, 0, 0] == pytest.approx(1.0)  # 255 red; 51/255/0.2


def test_rgb_image_to_grayscale_uses_pillow_luma(tmp_path):
    path = _save(tmp_path / "red.png", [[[255, 0, 0]]])
    # Pillow's L = (299 R + 587 G + 114 B) / 1000 = 76.245 -> 76
    assert preprocess_image(path, 1, (1, 1), None, None)[0, 0, 0] == pytest.approx(76 / 255)


def test_class_subfolders_give_sorted_labels_and_names(tmp_path, images_factory):
    root = images_factory(tmp_path / "imgs", ["zebra", "ant", "cat"], 2)
    (root / ".hidden").mkdir()  # hidden folders and non-image files are skipped
    (root / "ant" / "notes.txt").write_text("x")
    x, labels, info = load_image_folder(root, (3, 8, 6), ImagePrep(views=1))
    assert x.shape == (6, 3, 8, 6) and x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1
    assert labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert info["class_names"] == ["ant", "cat", "zebra"] and info["layout"] == "one subfolder per class"
    assert info["size"] == [8, 6] and info["channels"] == 3 and info["color"] == "RGB"
    assert info["mean"] == "none" and info["std"] == "none" and "bilinear" in info["resize"]


def test_one_mean_and_std_value_stands_for_every_channel(tmp_path, images_factory):
    # `--mean 0.5 --std 0.5`: how TensorFlow ports ([-1, 1] inputs) are described
    root = images_factory(tmp_path / "imgs", None, 2)
    one, _, info = load_image_folder(root, (3, 8, 8), ImagePrep(mean=(0.5,), std=(0.5,), views=1))
    each, _, _ = load_image_folder(root, (3, 8, 8), ImagePrep(mean=(0.5,) * 3, std=(0.5,) * 3, views=1))
    plain, _, _ = load_image_folder(root, (3, 8, 8), ImagePrep(views=1))
    np.testing.assert_array_equal(one, each)
    np.testing.assert_allclose(one, (plain - 0.5) / 0.5, atol=1e-6)
    assert info["mean"] == [0.5, 0.5, 0.5] and info["std"] == [0.5, 0.5, 0.5]


def test_flat_folder_has_no_labels_and_image_size_option(tmp_path, images_factory):
    root = images_factory(tmp_path / "flat", None, 3, mode="L")
    x, labels, info = load_image_folder(root, (1, None, None), ImagePrep(size=(5, 7), views=1))
    assert labels is None and x.shape == (3, 1, 5, 7)
    assert info["layout"] == "flat" and info["labels"] == "none" and info["color"] == "grayscale"


@pytest.mark.parametrize("case, error, words", [
    ("empty", DataError, "no images"),
    ("mixed", DataError, "both class subfolders and loose images"),
    ("empty-class", DataError, "class folder holds no images"),
    ("corrupt", DataError, "bad.png"),
    ("channels", DataError, "1 (grayscale) or 3 (RGB)"),
    ("mean", ConfigError, "--mean has 2 values"),
    ("size", ConfigError, "differs from the model's input 8x8"),
    ("dynamic", ConfigError, "give --image-size"),
])
def test_bad_folders_and_options(tmp_path, images_factory, case, error, words):
    root = tmp_path / "data"
    root.mkdir()
    shape, prep = (3, 8, 8), ImagePrep()
    if case == "mixed":
        images_factory(root, ["a"], 1)
        _save(root / "loose.png", [[1]])
    elif case == "empty-class":
        images_factory(root, ["a"], 1)
        (root / "b").mkdir()
    elif case == "corrupt":
        images_factory(root, None, 1)
        (root / "bad.png").write_bytes(b"not a png")
    elif case != "empty":
        images_factory(root, None, 1)
    shape = {"channels": (4, 8, 8), "dynamic": (3, None, None)}.get(case, shape)
    prep = {"mean": ImagePrep(mean=(0.5, 0.5)), "size": ImagePrep(size=(4, 4))}.get(case, prep)
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        load_image_folder(root, shape, prep)


def test_option_parsing():
    assert parse_floats("--mean", "0.485,0.456,0.406") == (0.485, 0.456, 0.406)
    assert parse_size("224x160") == (224, 160) and parse_size("32") == (32, 32)
    for text, words in (("a,b", "give comma-separated numbers, one per channel"), ("1,nan", "values must be finite")):
        with pytest.raises(ConfigError, match=f"--mean '{text}': {words}"):
            parse_floats("--mean", text)
    with pytest.raises(ConfigError, match="> 0"):
        parse_floats("--std", "0.2,0")
    for text in ("0x4", "3x", "axb", "1x2x3"):
        with pytest.raises(ConfigError, match=f"--image-size '{text}': give HxW with positive integers"):
            parse_size(text)


@pytest.mark.parametrize("images, views", [(1, 8), (8, 8), (12, 6), (40, 2), (63, 2), (64, 1), (500, 1)])
def test_small_folders_get_views_until_about_64_samples(images, views):
    assert auto_views(images) == views


def test_automatic_views_only_without_the_option(tmp_path, images_factory):
    root = images_factory(tmp_path / "few", None, 3)
    x, _, info = load_image_folder(root, (3, 8, 8))
    assert len(x) == 3 * 8 and info["views"] == 8 and info["views_chosen"].startswith("automatic")
    x, _, info = load_image_folder(root, (3, 8, 8), ImagePrep(views=2))
    assert len(x) == 6 and info["views_chosen"] == "--views"
    x, _, info = load_image_folder(root, (3, 8, 8), ImagePrep(views=1))
    assert len(x) == 3 and "views" not in info
