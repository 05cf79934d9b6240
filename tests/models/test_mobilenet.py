"""The built-in mobilenet-v2: strict checkpoint load, sensible classes on real photos, the photo
split. ImageNet class names ship in no installed package, so classes are checked by index
(281 tabby, 282 tiger cat, 285 Egyptian cat; 967 espresso, 968 cup, 504 coffee mug)."""
import numpy as np
import pytest
import torch
from PIL import Image

from sqexport.models.mobilenet_v2 import IMAGENET_MEAN, IMAGENET_STD, MobileNetV2, load_pretrained, weights_path
from sqexport.models.photos import CALIB_PHOTOS, EVAL_PHOTOS, CropPolicy, load_photo, normalize, photo_crops

CATS = {281, 282, 283, 284, 285}
COFFEE = {504, 967, 968}


@pytest.fixture(scope="module")
def model():
    return load_pretrained()


def _center_crop(name: str) -> torch.Tensor:
    """torchvision's eval preprocessing: shorter side to 256, centre 224 crop."""
    img = load_photo(name)
    h, w = img.shape[:2]
    s = 256 / min(h, w)
    a = np.asarray(Image.fromarray(img).resize((round(w * s), round(h * s)), Image.BILINEAR))
    top, left = (a.shape[0] - 224) // 2, (a.shape[1] - 224) // 2
    return torch.from_numpy(normalize(a[None, top:top + 224, left:left + 224], IMAGENET_MEAN, IMAGENET_STD))


def test_state_dict_keys_are_torchvisions():
    ckpt = torch.load(weights_path(), map_location="cpu", weights_only=True)
    assert list(MobileNetV2().state_dict()) == list(ckpt)  # same keys, same order, nothing extra
    assert len(ckpt) == 314


def test_real_photos_get_their_classes(model):
    with torch.no_grad():
        cat = model(_center_crop("chelsea")).softmax(-1)[0]
        coffee = model(_center_crop("coffee")).softmax(-1)[0]
    # hand-checked: chelsea -> 285 Egyptian cat (0.71), 282, 281; coffee -> 967 espresso (0.99)
    assert int(cat.argmax()) == 285 and set(cat.topk(3).indices.tolist()) <= CATS
    assert int(coffee.argmax()) == 967 and float(coffee[967]) > 0.9
    assert COFFEE & set(coffee.topk(5).indices.tolist()) == COFFEE


def test_photo_split_is_disjoint_and_deterministic():
    assert not set(CALIB_PHOTOS) & set(EVAL_PHOTOS)
    a = photo_crops(("chelsea", "coffee"), 3, seed=5)
    b = photo_crops(("chelsea", "coffee"), 3, seed=5)
    assert a.shape == (6, 224, 224, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, photo_crops(("chelsea", "coffee"), 3, seed=6))


def test_grayscale_photos_become_rgb_and_normalization():
    assert load_photo("camera").shape == (512, 512, 3)
    crops = photo_crops(("camera",), 1, seed=0, policy=CropPolicy(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False))
    x = normalize(crops, IMAGENET_MEAN, IMAGENET_STD)
    assert x.shape == (1, 3, 224, 224) and x.dtype == np.float32
    want = (crops[0, 10, 20, 1] / 255.0 - IMAGENET_MEAN[1]) / IMAGENET_STD[1]
    assert x[0, 1, 10, 20] == pytest.approx(want, rel=1e-5)
