"""open_clip's training image transform, the same pixels and the same random draws, with less
Python per sample.

open_clip's train transform for a model without extra augmentation is
``Compose([RandomResizedCrop, MaybeConvertMode, MaybeToTensor, Normalize])``. On the tiny models
simgap trains on a CPU it cost ~0.25 ms a sample of the dataloader's ~0.5 ms, mostly outside the
pixel work: torchvision's ``get_params`` makes six small tensors a draw (and a ``log`` of the
ratio each call), ``to_tensor`` and ``Normalize`` log API usage and allocate three tensors. The
dataloader worker shares the core with the model step, so that time came out of training.

:class:`CropResizeNormalize` does the same steps in the same order:

- the crop box is drawn from torch's global generator with the same calls in the same order as
  ``RandomResizedCrop.get_params`` (``uniform_`` of the area, ``uniform_`` and float32 ``exp`` of
  the log ratio, ``random_`` of the top and left), into tensors allocated once, so a dataloader
  worker seeded as before draws the same boxes;
- ``crop`` then ``resize`` with PIL, as torchvision's PIL path does;
- the mode conversion;
- ``(x / 255 - mean) / std`` in float32, one rounding per operation as torch's ``div`` and
  ``sub_``/``div_`` do, so the tensors are bit-equal (``tests/test_augment.py`` compares them).

:func:`fast_train_transform` returns it only for a Compose of exactly that shape; anything else
(color jitter, grayscale, a tensor input pipeline) is left as open_clip made it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image


class CropResizeNormalize:
    """RandomResizedCrop (PIL) + convert(mode) + ToTensor + Normalize as one callable."""

    def __init__(
        self,
        size: tuple[int, int],
        scale: tuple[float, float],
        ratio: tuple[float, float],
        resample: int,
        mode: str,
        mean: tuple[float, ...],
        std: tuple[float, ...],
    ):
        self.size, self.scale, self.resample, self.mode = size, scale, resample, mode
        log_ratio = torch.log(torch.tensor(ratio))  # float32, as get_params computes it
        self.log_ratio = (float(log_ratio[0]), float(log_ratio[1]))
        self.ratio = ratio
        self.mean = np.asarray(mean, np.float32).reshape(-1, 1, 1)
        self.std = np.asarray(std, np.float32).reshape(-1, 1, 1)
        # The draw buffers are made on first use in each process, never pickled: torch's
        # multiprocessing pickler would put them in shared memory, one buffer for every worker.
        self._draw: torch.Tensor | None = None
        self._index: torch.Tensor | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_draw": None, "_index": None}

    def box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(top, left, h, w): ``RandomResizedCrop.get_params``, draw for draw."""
        if self._draw is None:
            self._draw = torch.empty(1)
            self._index = torch.empty(1, dtype=torch.int64)
        draw, index = self._draw, self._index
        area = height * width
        for _ in range(10):
            target_area = area * draw.uniform_(self.scale[0], self.scale[1]).item()
            aspect_ratio = draw.uniform_(self.log_ratio[0], self.log_ratio[1]).exp_().item()
            w = int(round(math.sqrt(target_area * aspect_ratio)))
            h = int(round(math.sqrt(target_area / aspect_ratio)))
            if 0 < w <= width and 0 < h <= height:
                top = index.random_(0, height - h + 1).item()
                left = index.random_(0, width - w + 1).item()
                return top, left, h, w
        # torchvision's fallback: a central crop at the nearest allowed ratio
        in_ratio = float(width) / float(height)
        if in_ratio < min(self.ratio):
            w, h = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            h, w = height, int(round(height * max(self.ratio)))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, img: Image.Image) -> torch.Tensor:
        top, left, h, w = self.box(*img.size)
        img = img.crop((left, top, left + w, top + h)).resize(self.size[::-1], self.resample)
        if img.mode != self.mode:
            img = img.convert(self.mode)
        pixels = np.asarray(img, np.uint8)
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        x = pixels.transpose(2, 0, 1).astype(np.float32)
        x /= np.float32(255)
        x -= self.mean
        x /= self.std
        return torch.from_numpy(x)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(size={self.size}, scale={self.scale}, ratio={self.ratio}, "
            f"resample={self.resample}, mode={self.mode!r})"
        )


def fast_train_transform(transform):
    """``transform`` as a :class:`CropResizeNormalize` when it is open_clip's plain train
    Compose (RandomResizedCrop with antialias on PIL images, MaybeConvertMode, MaybeToTensor,
    Normalize); otherwise ``transform`` itself."""
    from open_clip.transform import MaybeConvertMode, MaybeToTensor
    from torchvision.transforms import Compose, Normalize, RandomResizedCrop
    from torchvision.transforms.functional import pil_modes_mapping

    steps = getattr(transform, "transforms", None)
    if type(transform) is not Compose or [type(s) for s in steps or ()] != [
        RandomResizedCrop,
        MaybeConvertMode,
        MaybeToTensor,
        Normalize,
    ]:
        return transform
    crop, convert, _, normalize = steps
    if crop.antialias is False or normalize.inplace or len(crop.size) != 2:
        return transform
    resample = pil_modes_mapping.get(crop.interpolation)
    if resample is None:
        return transform
    return CropResizeNormalize(
        size=tuple(crop.size),
        scale=tuple(crop.scale),
        ratio=tuple(crop.ratio),
        resample=resample,
        mode=convert.mode,
        mean=tuple(normalize.mean),
        std=tuple(normalize.std),
    )
