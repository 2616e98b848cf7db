"""OpenCLIP training adapter: a typed recipe becomes open_clip_train's argv, nothing more.

Training itself is open_clip_train (``open_clip_train.main.main``), run in a subprocess through
``python -m simgap._train_entry`` (which registers simgap's model configs and seeds the sample
shuffle). Layout of a run, as open_clip_train writes it under ``--logs out_dir --name name``::

    out_dir/name/out.log                  open_clip_train's own log (appended across resumes)
    out_dir/name/params.txt               every parsed argument (rewritten on each start)
    out_dir/name/checkpoints/epoch_latest.pt  rewritten atomically after every epoch (resume)
    out_dir/name/checkpoints/epoch_<E>.pt     the final checkpoint (and every save_frequency)
    out_dir/name/simgap-train.json        what was trained: recipe, data, sample count
    out_dir/name/simgap-train.log         the subprocess's stdout+stderr (appended)
    out_dir/name/simgap-done.json         written last, after a successful run
    out_dir/name/keys.h128.npy            the key list as sorted 128-bit hashes (key-list runs)

Training data is either materialized shards (every sample is trained on) or source shards plus
a key list (``keys.txt`` / ``keys.parquet`` of a split): the key list is applied on the fly, in
the data pipeline right after the tar reader, so only the listed samples are shuffled, decoded
and trained on, and nothing is resharded.

A run killed at any point is resumed by calling :func:`train` again with the same arguments:
open_clip_train's ``--resume latest --save-most-recent`` restarts from ``epoch_latest.pt``.
With ``gpus > 1`` (or ``torchrun=True``) :func:`train` starts the ranks itself, as
``python -m torch.distributed.run`` of this interpreter, through the same claim, resume check
and done record. Trainings side by side get disjoint GPU sets (:func:`gpu_sets`,
:class:`GpuSlots`), each training's process sees only its own (``CUDA_VISIBLE_DEVICES``).

Note: open_clip_train turns on cudnn.benchmark and TF32 whenever CUDA is available, so GPU
training is not bitwise reproducible; only the sample order is.

Modules: ``recipe`` (the recipe, its argv, the run folder's names), ``prepare`` (claiming the
run folder, the key filter, the checks before a launch), ``gpus`` (GPU sets), ``launch``
(``train``, torchrun, launch scripts), ``slurm`` (sbatch scripts). This package is the public
interface; callers import from ``simgap.train``.
"""

from simgap.train.gpus import GpuSlots, gpu_sets, train_env, visible_gpus
from simgap.train.launch import launch_script, torchrun_command, train, write_launch_script
from simgap.train.prepare import (
    KEY_HASH,
    KEY_HASHES_FILE,
    check_resumable,
    count_samples,
    key_hash,
    key_hashes,
    prepare_run,
)
from simgap.train.recipe import (
    DONE_FILE,
    ENTRY_MODULE,
    KEYS_OPTION,
    LOG_FILE,
    RECORD_FILE,
    Recipe,
    TrainError,
    open_clip_argv,
    run_dir,
)
from simgap.train.slurm import SlurmJob, slurm_script

__all__ = [
    "DONE_FILE",
    "ENTRY_MODULE",
    "KEYS_OPTION",
    "KEY_HASH",
    "KEY_HASHES_FILE",
    "LOG_FILE",
    "RECORD_FILE",
    "GpuSlots",
    "Recipe",
    "SlurmJob",
    "TrainError",
    "check_resumable",
    "count_samples",
    "gpu_sets",
    "key_hash",
    "key_hashes",
    "launch_script",
    "open_clip_argv",
    "prepare_run",
    "run_dir",
    "slurm_script",
    "torchrun_command",
    "train",
    "train_env",
    "visible_gpus",
    "write_launch_script",
]
