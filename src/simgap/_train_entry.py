"""Process entry point: ``python -m simgap._train_entry ARGV...`` runs open_clip_train.

It is open_clip_train's ``main`` with these additions, all made before ``main`` runs:

1. simgap's shipped model configs are registered, so ``--model simgap-tiny`` resolves.
2. The per-sample shuffle buffer of open_clip_train's webdataset pipeline is seeded from
   ``--seed`` and the epoch: open_clip_train calls ``webdataset.shuffle(bufsize, initial)``
   without an rng, and webdataset then seeds it from ``pid + time``, so two runs of the same
   recipe would see the samples in different orders. The replacement is open_clip's own
   ``detshuffle2`` on open_clip_train's shared epoch, so a resumed epoch sees the samples in
   the order the uninterrupted run did.
3. ``--simgap-keys FILE`` (first on the command line, not an open_clip_train option): only
   samples whose ``__key__`` is in the key list pass, filtered right after the tar reader
   (before the shuffle buffer and the image decoder). FILE holds the sorted 128-bit key hashes
   that :func:`simgap.train.prepare_run` writes; it is memory-mapped, so every dataloader
   worker on a node shares one copy in the page cache.
4. A checkpoint is resumed only if it loads with ``torch.load(weights_only=True)``.
5. AdamW runs fused (one kernel over all parameters): the same update rule, but on a CPU the
   tiny models spend ~28% of each step in the unfused per-tensor update (31 ms vs 3.7 ms a
   step for simgap-tiny at batch 64, 1 thread), mostly on the 49,408-row token embedding.
6. Each dataloader worker memoizes the tokenizer per caption (bounded): every caption comes
   back once an epoch, and open_clip's tokenizer (ftfy + BPE, ~1-3 ms a caption on a CPU)
   cost tiny models more than their forward pass. The tokens are the same either way.
7. webdataset's tar member reader is :func:`simgap.train.tarstream.tar_file_iterator`: the same
   members in the same order, parsed without ``tarfile`` (23.5 against 3.7 us a member here,
   benchmarks/iter_samples.py; a sample is three members). Compressed shards and streams that
   are not local files still go through webdataset's own reader.
8. open_clip's plain train transform (RandomResizedCrop, RGB, ToTensor, Normalize) runs as
   :class:`simgap.train.augment.CropResizeNormalize`: the same random draws and bit-equal
   tensors, at about half the per-sample cost (the dataloader worker shares a core with the
   model step on a CPU). Any other transform is left as open_clip made it.
9. On a CPU, a convolutional image tower (open_clip's ModifiedResNet) is kept in channels-last
   memory format: oneDNN's convolutions run ~14% faster a step for simgap-tiny at batch 64 on
   one thread (82 against 71 ms, contiguous input batches). The model and the update rule are
   the same; the sums run in another order, so the weights differ from a contiguous run's in
   the last bits (a run is still bit-reproducible on one machine).

torchrun and srun launch this module on every rank, so the additions apply to every rank.
"""

from __future__ import annotations

import logging
import sys


def _seeded_sample_shuffle(seed: int, data):
    """A replacement for ``webdataset.shuffle`` in open_clip_train's pipeline (module ``data``):
    open_clip's own ``detshuffle2``, seeded with ``seed`` plus the epoch that open_clip_train
    sets before every epoch (its ``SharedEpoch``, also right after a resume). webdataset's
    ``detshuffle`` would count passes in each worker process instead, and after a resume the
    first pass of a fresh process is not the epoch it trains: the resumed epoch would see
    another sample order than the uninterrupted run."""
    epochs = []  # every SharedEpoch made; get_wds_dataset makes its own before the shuffle
    make = data.SharedEpoch.__init__

    def tracked(self, epoch: int = 0) -> None:
        make(self, epoch)
        epochs.append(self)

    data.SharedEpoch.__init__ = tracked

    # Only the arguments open_clip_train 3.3.0 passes: a call that passes more (an rng of
    # its own) fails here instead of being ignored.
    def shuffle(bufsize: int = 1000, initial: int = 100):
        return data.detshuffle2(bufsize=bufsize, initial=initial, seed=seed, epoch=epochs[-1])

    return shuffle


class KeyFilter:
    """Keeps the samples whose key hash is in a sorted 128-bit hash array (loaded lazily, mmap)."""

    def __init__(self, path: str):
        import numpy as np

        from simgap.train import KEY_HASH

        hashes = np.load(path, mmap_mode="r")  # fail here, in the main process, if unreadable
        if hashes.dtype != KEY_HASH or hashes.ndim != 1:
            raise SystemExit(f"{path}: not a key filter (1-d array of 128-bit key hashes)")
        self.path = path
        self._hashes = None  # mapped again in each dataloader worker, on first use

    def __getstate__(self) -> dict:
        return {"path": self.path, "_hashes": None}  # a spawned worker maps the file itself

    def __call__(self, sample: dict) -> bool:
        import numpy as np

        from simgap.train import KEY_HASH, key_hash

        if self._hashes is None:
            self._hashes = np.load(self.path, mmap_mode="r")
        h = np.array(key_hash(sample["__key__"]), KEY_HASH)
        i = int(np.searchsorted(self._hashes, h))
        return i < len(self._hashes) and self._hashes[i] == h


class FilteredReader:
    """open_clip_train's tar reader stage (``tarfile_to_samples_nothrow(src, handler=...)``)
    with the key filter after it; a class, so that spawned dataloader workers can unpickle it."""

    def __init__(self, reader, keep: KeyFilter):
        self.reader, self.keep = reader, keep

    def __call__(self, src, *args, **kwargs):
        for sample in self.reader(src, *args, **kwargs):
            if self.keep(sample):
                yield sample


def _fast_tar_members() -> None:
    """webdataset's tar_file_expander looks up ``tar_file_iterator`` at call time, in the
    dataloader workers too (forked after this patch)."""
    import functools

    import webdataset.tariterators as tariterators

    from simgap.train.tarstream import tar_file_iterator

    original = tariterators.tar_file_iterator
    if getattr(original, "func", None) is not tar_file_iterator:
        tariterators.tar_file_iterator = functools.partial(tar_file_iterator, fallback=original)


def _channels_last_on_cpu(model) -> None:
    """Item 9: a CPU model's convolutional image tower in channels-last format (in place)."""
    import torch

    visual = getattr(model, "visual", None)
    if visual is None:
        return
    # A ViT's one patch-embedding conv gains nothing; only a tower of convolutions does.
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in visual.modules())
    if convs > 1 and all(p.device.type == "cpu" for p in visual.parameters()):
        visual.to(memory_format=torch.channels_last)


def _fast_model_and_transforms(create):
    """``create_model_and_transforms`` with items 8 and 9 applied to what it returns."""
    import functools

    from simgap.train.augment import fast_train_transform

    @functools.wraps(create)
    def made(*args, **kwargs):
        model, preprocess_train, preprocess_val = create(*args, **kwargs)
        _channels_last_on_cpu(model)
        return model, fast_train_transform(preprocess_train), preprocess_val

    return made


def _weights_only_load(file_path, map_location=None):
    import fsspec
    import torch

    with fsspec.open(file_path, "rb") as f:
        return torch.load(f, map_location=map_location, weights_only=True)


class _FusedAdamW:
    """Stands in for the ``torch.optim`` module that open_clip_train.main names ``optim``:
    ``AdamW`` is made fused, everything else is torch.optim's own."""

    def __getattr__(self, name: str):
        import torch.optim

        return getattr(torch.optim, name)

    @staticmethod
    def AdamW(params, **kwargs):  # noqa: N802 (torch's name)
        import torch.optim

        return torch.optim.AdamW(params, fused=True, **kwargs)


class CachedTokenizer:
    """open_clip's tokenizer with a per-process memo of single captions (the calls
    open_clip_train's webdataset pipeline makes: one caption at a time)."""

    def __init__(self, tokenizer, max_entries: int = 200_000):
        self.tokenizer, self.max_entries = tokenizer, max_entries
        self._memo: dict = {}

    def __getattr__(self, name: str):
        if name == "tokenizer":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.tokenizer, name)

    def __call__(self, texts, *args, **kwargs):
        if args or kwargs or not isinstance(texts, str):
            return self.tokenizer(texts, *args, **kwargs)
        tokens = self._memo.get(texts)
        if tokens is None:
            tokens = self.tokenizer(texts)
            if len(self._memo) < self.max_entries:  # web-scale captions rarely repeat: stop
                self._memo[texts] = tokens
        # A copy: the collate stacks it anyway, and no caller can then change the memo.
        return tokens.clone()


def _cached_get_tokenizer(get_tokenizer):
    def make(*args, **kwargs):
        return CachedTokenizer(get_tokenizer(*args, **kwargs))

    return make


def split_own_options(argv: list[str]) -> tuple[str | None, list[str]]:
    """(key filter file or None, open_clip_train's argv)."""
    from simgap.train import KEYS_OPTION

    if argv[:1] == ["--"]:  # the separator after torchrun's own options, if torchrun kept it
        argv = argv[1:]
    if argv[:1] == [KEYS_OPTION]:
        if len(argv) < 2:
            raise SystemExit(f"{KEYS_OPTION} needs a file")
        return argv[1], argv[2:]
    return None, argv


def main(argv: list[str]) -> int:
    keys, argv = split_own_options(argv)
    # Parse first: params imports only argparse, so a bad command line fails in a second
    # instead of after the ~5-10 s import of torch and open_clip.
    from open_clip_train.params import parse_args

    seed = parse_args(argv).seed

    import open_clip_train.data
    import open_clip_train.main

    from simgap.models import register_shipped_configs

    register_shipped_configs()
    # open_clip_train.data looks up `wds.shuffle` and `tarfile_to_samples_nothrow` at call
    # time, and open_clip_train.main `pt_load`: patch those module attributes.
    open_clip_train.data.wds.shuffle = _seeded_sample_shuffle(seed, open_clip_train.data)
    if keys is not None:
        reader = open_clip_train.data.tarfile_to_samples_nothrow
        open_clip_train.data.tarfile_to_samples_nothrow = FilteredReader(reader, KeyFilter(keys))
    _fast_tar_members()
    open_clip_train.main.pt_load = _weights_only_load
    open_clip_train.main.optim = _FusedAdamW()
    open_clip_train.main.get_tokenizer = _cached_get_tokenizer(open_clip_train.main.get_tokenizer)
    open_clip_train.main.create_model_and_transforms = _fast_model_and_transforms(
        open_clip_train.main.create_model_and_transforms
    )
    result = open_clip_train.main.main(argv)
    # open_clip_train raised every logger to INFO, so torch's compiler prints its (empty)
    # metrics at exit: quiet torch's loggers once training is over.
    for name in list(logging.root.manager.loggerDict):
        if name == "torch" or name.startswith("torch."):
            logging.getLogger(name).setLevel(logging.WARNING)
    # open_clip_train reports some refusals ("Experiment already exists") by returning -1
    # after a print; turn them into a failing exit status.
    return 1 if result == -1 else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
