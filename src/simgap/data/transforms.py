"""A model's eval transform, split for batched work: per-image PIL steps, then batched tensor ops.

open_clip's eval transform is a torchvision ``Compose([Resize, CenterCrop, MaybeConvertMode,
ToTensor, Normalize])``. Run per image, the tensor steps and torchvision's per-call overhead cost
more than the tiny model's forward. ``split_transform`` cuts it at ``ToTensor``: the PIL part
runs per image (in decode workers) and gives uint8 pixels; ``ToTensor`` + ``Normalize`` run once
per batch. For the common ``Resize`` (+ ``CenterCrop``) steps the PIL part calls
Pillow directly with the sizes and boxes torchvision computes. Every path gives bitwise the
per-image transform's pixels (tests compare them over many image shapes).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class SplitTransform:
    """``per_image`` gives HWC uint8 pixels (or, for a transform that could not be split, its
    own output); ``batch`` stacks a batch of them into the model's input."""

    per_image: Callable[[Any], Any]
    normalize: tuple[tuple[torch.Tensor, torch.Tensor], ...] | None  # None: not split

    def batch(self, items: list) -> torch.Tensor:
        if self.normalize is None:
            return torch.stack(items)
        # contiguous NCHW, as stacking per-image tensors gives: a permuted (channels-last) batch
        # takes other conv kernels, whose float results differ in the last bits. The float32
        # arithmetic is ToTensor's and Normalize's, in their order.
        x = torch.from_numpy(np.stack(items)).permute(0, 3, 1, 2).contiguous().float().div(255)
        for mean, std in self.normalize:
            x = x.sub_(mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1))
        return x


def split_transform(preprocess: Callable[[Any], torch.Tensor]) -> SplitTransform:
    """Split a torchvision ``Compose([...PIL ops, ToTensor, Normalize...])``; anything else is
    kept whole (its per-image outputs are stacked)."""
    from torchvision import transforms as T

    steps = getattr(preprocess, "transforms", None)
    cut = next((i for i, t in enumerate(steps or []) if isinstance(t, T.ToTensor)), None)
    if cut is None or not all(isinstance(t, T.Normalize) for t in steps[cut + 1 :]):
        return SplitTransform(preprocess, None)
    norms = tuple(
        (torch.as_tensor(t.mean, dtype=torch.float32), torch.as_tensor(t.std, dtype=torch.float32))
        for t in steps[cut + 1 :]
    )
    return SplitTransform(resize_crop(steps[:cut]) or PilPart(T.Compose(steps[:cut])), norms)


@dataclass(frozen=True)
class PilPart:
    """The transform's PIL steps, then HWC uint8 pixels (picklable for DataLoader workers)."""

    steps: Callable[[Any], Any]

    def __call__(self, image: Any) -> np.ndarray:
        return _rgb_pixels(self.steps(image))


def _rgb_pixels(image: Any) -> np.ndarray:
    if getattr(image, "mode", None) != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8)


@dataclass(frozen=True)
class ResizeCrop:
    """torchvision's ``Resize`` then (optionally) ``CenterCrop`` on a PIL image, as Pillow calls.

    ``short`` is Resize's shorter-side length (``size`` an int or one-element list), else
    ``size`` is the (height, width) to resize to. The sizes, rounding and crop box are
    torchvision's (``functional.resize`` / ``center_crop``); a crop larger than the resized
    image (torchvision pads) goes through ``fallback``, the torchvision steps themselves.
    """

    short: int | None
    size: tuple[int, int] | None
    interpolation: int  # a Pillow resampling filter
    crop: tuple[int, int] | None  # (height, width); None: no crop
    fallback: Callable[[Any], Any]

    def __call__(self, image: Any) -> np.ndarray:
        w, h = image.size
        if self.short is not None:
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = self.short, int(self.short * long / short)
            new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        else:
            new_h, new_w = self.size
        crop_h, crop_w = self.crop or (new_h, new_w)
        if crop_w > new_w or crop_h > new_h:
            return _rgb_pixels(self.fallback(image))
        if (new_w, new_h) != (w, h):
            image = image.resize((new_w, new_h), self.interpolation)
        if (crop_w, crop_h) != (new_w, new_h):  # a full-size crop is the image itself
            top = int(round((new_h - crop_h) / 2.0))
            left = int(round((new_w - crop_w) / 2.0))
            image = image.crop((left, top, left + crop_w, top + crop_h))
        return _rgb_pixels(image)


def resize_crop(steps: Sequence[Any]) -> ResizeCrop | None:
    """A ``ResizeCrop`` for PIL steps that are exactly ``Resize``, optionally ``CenterCrop``,
    optionally a conversion to RGB; None for anything else (it then runs as given)."""
    from torchvision import transforms as T
    from torchvision.transforms.functional import pil_modes_mapping

    rest = list(steps)
    resize = rest.pop(0) if rest and type(rest[0]) is T.Resize else None
    crop = rest.pop(0) if rest and type(rest[0]) is T.CenterCrop else None
    if rest and _converts_to_rgb(rest[0]):
        rest.pop(0)
    if resize is None or rest:
        return None
    if resize.max_size is not None or resize.interpolation not in pil_modes_mapping:
        return None
    size = resize.size
    if isinstance(size, int) or len(size) == 1:
        short, hw = (size if isinstance(size, int) else size[0]), None
    else:
        short, hw = None, (int(size[0]), int(size[1]))
    crop_hw = (int(crop.size[0]), int(crop.size[1])) if crop is not None else None
    return ResizeCrop(
        short, hw, pil_modes_mapping[resize.interpolation], crop_hw, T.Compose(list(steps))
    )


def _converts_to_rgb(step: Any) -> bool:
    # open_clip's MaybeConvertMode; the pixels are made RGB in any case.
    return type(step).__name__ == "MaybeConvertMode" and getattr(step, "mode", None) == "RGB"
