"""The split eval transform gives bitwise the pixels of the model's own per-image transform."""

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from simgap.data.transforms import PilPart, ResizeCrop, split_transform

# Shapes around every branch: square, portrait, landscape, odd sides, already the target size,
# smaller than the crop (torchvision pads), extreme aspect ratios, rounding of the crop box.
SHAPES = [
    (64, 64),
    (50, 90),
    (90, 50),
    (33, 31),
    (32, 32),
    (20, 45),
    (45, 20),
    (31, 31),
    (1, 300),
    (300, 1),
    (17, 200),
    (224, 224),
    (225, 300),
    (301, 226),
    (7, 7),
]


def _images(rgb_only=False):
    rng = np.random.default_rng(0)
    for h, w in SHAPES:
        yield Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    if not rgb_only:  # open_clip's transform converts; plain torchvision steps need RGB input
        yield Image.fromarray(rng.integers(0, 255, (40, 70), dtype=np.uint8), "L")
        yield Image.fromarray(rng.integers(0, 255, (70, 40, 4), dtype=np.uint8), "RGBA")


def _assert_bitwise(preprocess, rgb_only=False):
    split = split_transform(preprocess)
    whole, parts = [], []
    for im in _images(rgb_only):
        try:
            expected = preprocess(im)
        except ValueError as e:  # e.g. a 1x300 image that keep-ratio resizes to width 0
            with pytest.raises(type(e)):
                split.per_image(im)
            continue
        whole.append(expected)
        parts.append(split.per_image(im))
    assert len(whole) >= len(SHAPES) - 2
    batch = split.batch(parts)
    assert batch.is_contiguous()
    assert torch.equal(batch, torch.stack(whole))
    return split


@pytest.mark.parametrize("size", [32, 33, 224, (32, 48)])
@pytest.mark.parametrize("mode", ["shortest", "squash", "longest"])
def test_open_clip_eval_transforms_split_bitwise(size, mode):
    preprocess = open_clip.image_transform(size, is_train=False, resize_mode=mode)
    split = _assert_bitwise(preprocess)
    assert split.normalize is not None
    # torchvision's Resize (+ CenterCrop) go straight to Pillow; open_clip's keep-ratio resize
    # ("longest", or "shortest" to a rectangle) keeps its steps.
    direct = type(preprocess.transforms[0]) is T.Resize
    assert direct == (mode == "squash" or mode == "shortest" and isinstance(size, int))
    assert isinstance(split.per_image, ResizeCrop if direct else PilPart)


NORM = [T.ToTensor(), T.Normalize((0.5, 0.4, 0.3), (0.2, 0.3, 0.25))]


@pytest.mark.parametrize(
    "steps",
    [
        [T.Resize([40]), T.CenterCrop(36)],
        [T.Resize(24, T.InterpolationMode.BILINEAR), T.CenterCrop((20, 24))],
        [T.Resize(30, T.InterpolationMode.NEAREST), T.CenterCrop(31)],
        [T.Resize((28, 30), T.InterpolationMode.LANCZOS)],
        [T.Resize((21, 35)), T.CenterCrop((25, 30))],
    ],
    ids=["list-size", "bilinear-rect-crop", "nearest-pad", "lanczos-no-crop", "hw-pad"],
)
def test_torchvision_resize_and_crop_split_bitwise(steps):
    split = _assert_bitwise(T.Compose([*steps, *NORM]), rgb_only=True)
    assert isinstance(split.per_image, ResizeCrop)


def test_other_pil_steps_run_as_given():
    preprocess = T.Compose([T.Resize(30), T.Grayscale(3), T.CenterCrop(28), *NORM])
    assert isinstance(_assert_bitwise(preprocess, rgb_only=True).per_image, PilPart)
    capped = T.Compose([T.Resize(30, max_size=40), T.CenterCrop(28), *NORM])
    assert isinstance(_assert_bitwise(capped, rgb_only=True).per_image, PilPart)
