"""Which engine runs each stage's tasks, from the config: built by ``parallel.build_engine``, the
builder the CLI uses too, so a stage's tasks ask Ray for a GPU exactly when its device is CUDA."""

from __future__ import annotations

from dataclasses import dataclass

from simgap.experiment.config import Config
from simgap.parallel import EngineSpec, Executor, build_engine
from simgap.scan.kernel import KernelConfig


@dataclass(frozen=True)
class Executors:
    """One executor per kind of stage work."""

    embed: Executor  # the similarity model over images: [similarity].device
    scan: Executor  # the scan and the guarantee check: [scan].device and its engine overrides
    io: Executor  # materialize: copies, on the CPU

    @classmethod
    def every(cls, executor: Executor) -> Executors:
        """The same executor for every stage (tests, or a caller that chose one)."""
        return cls(executor, executor, executor)


def engine_spec(cfg: Config) -> EngineSpec:
    e = cfg.engine
    return EngineSpec(e.name, e.workers, e.address or None, e.gpus_per_task, e.cpus_per_gpu_task)


def scan_engine_spec(cfg: Config) -> EngineSpec:
    """``[engine]`` with ``[scan]``'s overrides (engine, workers, GPUs per task)."""
    base, s = engine_spec(cfg), cfg.scan
    return EngineSpec(
        s.engine or base.name,
        s.workers or base.workers,
        base.address,
        s.gpus_per_task or base.gpus_per_task,
        base.cpus_per_gpu_task,
    )


def executors_of(cfg: Config, gpu_count: int | None = None) -> Executors:
    """``gpu_count``: GPUs a local pool spreads over (None: as many as torch sees)."""
    spec = engine_spec(cfg)
    return Executors(
        embed=Executor(build_engine(spec, cfg.similarity.device, gpu_count)),
        scan=Executor(build_engine(scan_engine_spec(cfg), cfg.scan.device, gpu_count)),
        io=Executor(build_engine(spec, "cpu")),
    )


def kernel_config(cfg: Config) -> KernelConfig:
    """``[scan]``'s device, screen precision and tiles (0: the kernel's default)."""
    s = cfg.scan
    return KernelConfig(
        precision=s.precision,
        device=s.device,
        tile_rows=s.tile_rows or None,
        tile_tests=s.tile_tests or None,
    )
