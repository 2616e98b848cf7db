"""simgap.train.augment: open_clip's train transform, bit for bit and draw for draw."""

from __future__ import annotations

import io
import pickle

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from simgap.models import register_shipped_configs
from simgap.train.augment import CropResizeNormalize, fast_train_transform


@pytest.fixture(scope="module")
def preprocess_train():
    register_shipped_configs()
    _, train, _ = open_clip.create_model_and_transforms("simgap-tiny")
    return train


def _images() -> list[Image.Image]:
    """Photos through JPEG (what a shard holds), odd sizes, other modes, and shapes so thin
    that every one of get_params' ten draws fails (its central-crop fallback)."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(40):
        w, h = int(rng.integers(20, 130)), int(rng.integers(20, 130))
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        if i % 2:
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=80)
            img = Image.open(buf)
        out.append(img)
    out += [
        Image.new("L", (50, 70), 7),
        Image.new("RGBA", (90, 20), (1, 2, 3, 4)),
        Image.new("P", (33, 41), 5),
        Image.new("RGB", (3, 400), (9, 200, 40)),
        Image.new("RGB", (400, 2), (255, 0, 0)),
        Image.new("RGB", (32, 32), (0, 0, 0)),
    ]
    return out


def test_same_tensors_and_same_draws_as_open_clip(preprocess_train):
    fast = fast_train_transform(preprocess_train)
    assert isinstance(fast, CropResizeNormalize)
    images = _images()
    torch.manual_seed(11)
    expected = [preprocess_train(img) for img in images]
    after_expected = torch.rand(3)
    torch.manual_seed(11)
    got = [fast(img) for img in images]
    after_got = torch.rand(3)
    for i, (a, b) in enumerate(zip(expected, got, strict=True)):
        assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape == (3, 32, 32), i
        assert torch.equal(a, b), f"image {i}: max diff {(a - b).abs().max()}"
    # the generator is left where torchvision leaves it: later draws are the same too
    assert torch.equal(after_expected, after_got)


def test_a_pickled_copy_draws_as_the_original(preprocess_train):
    """Spawned dataloader workers unpickle the transform: the copy must behave the same."""
    fast = fast_train_transform(preprocess_train)
    img = _images()[1]
    fast(img)  # the draw buffers exist now; the pickle must not carry them
    copy = pickle.loads(pickle.dumps(fast))
    torch.manual_seed(5)
    a = [fast(img) for _ in range(5)]
    torch.manual_seed(5)
    b = [copy(img) for _ in range(5)]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], a[1])  # the draws do change the crop


def test_other_transforms_are_left_alone(preprocess_train):
    register_shipped_configs()
    _, jitter, val = open_clip.create_model_and_transforms(
        "simgap-tiny", aug_cfg={"color_jitter": (0.4, 0.4, 0.4, 0.1), "color_jitter_prob": 1.0}
    )
    assert fast_train_transform(jitter) is jitter
    assert fast_train_transform(val) is val  # Resize + CenterCrop: not the train Compose
    assert fast_train_transform(len) is len


def test_train_entry_makes_open_clip_trains_transform_fast(preprocess_train):
    from simgap._train_entry import _fast_model_and_transforms

    register_shipped_configs()
    create = _fast_model_and_transforms(open_clip.create_model_and_transforms)
    model, train, val = create("simgap-tiny")
    assert isinstance(train, CropResizeNormalize)
    assert isinstance(model, torch.nn.Module) and not isinstance(val, CropResizeNormalize)
    # the ResNet tower is channels-last (item 9); a ViT keeps its layout
    conv = model.visual.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    vit, _, _ = create("simgap-tiny-vit")
    assert vit.visual.conv1.weight.is_contiguous()
