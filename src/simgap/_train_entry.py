"""Process entry point: ``python -m simgap._train_entry ARGV...`` runs open_clip_train.

It is open_clip_train's ``main`` with two additions, both needed before ``main`` runs:

1. simgap's shipped model configs are registered, so ``--model simgap-tiny`` resolves.
2. The per-sample shuffle buffer of open_clip_train's webdataset pipeline is seeded from
   ``--seed``: open_clip_train calls ``webdataset.shuffle(bufsize, initial)`` without an rng,
   and webdataset then seeds it from ``pid + time``, so two runs of the same recipe would
   see the samples in different orders. The replacement is webdataset's own ``detshuffle``.

torchrun and srun launch this module on every rank, so both additions apply to every rank.
"""

from __future__ import annotations

import logging
import sys


def _seeded_sample_shuffle(seed: int):
    import webdataset

    # Only the arguments open_clip_train 3.3.0 passes: a call that passes more (an rng of
    # its own) fails here instead of being ignored.
    def shuffle(bufsize: int = 1000, initial: int = 100):
        # detshuffle reseeds with seed + n on its n-th pass over the data in this worker.
        return webdataset.detshuffle(bufsize=bufsize, initial=initial, seed=seed)

    return shuffle


def main(argv: list[str]) -> int:
    # Parse first: params imports only argparse, so a bad command line fails in a second
    # instead of after the ~5-10 s import of torch and open_clip.
    from open_clip_train.params import parse_args

    seed = parse_args(argv).seed

    import open_clip_train.data
    import open_clip_train.main

    from simgap.models import register_shipped_configs

    register_shipped_configs()
    # open_clip_train.data looks up `wds.shuffle` at call time: patch that module attribute.
    open_clip_train.data.wds.shuffle = _seeded_sample_shuffle(seed)
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
