"""The built-in miniature world: a reference set, a captioned pool and six benchmarks.

`generate_world(WorldConfig(...), out_dir)` writes the world directory described in
docs/CONTRACTS.md; `render` holds the pure per-domain image renderers.
"""

from simgap.world.render import CLASSNAMES, DOMAINS, MAX_CLASSES, render_image
from simgap.world.writer import (
    BENCHMARKS,
    GENERATOR_VERSION,
    TEMPLATES,
    WorldConfig,
    benchmark_key,
    generate_world,
    pool_ground_truth,
    pool_key,
    reference_key,
)

__all__ = [
    "BENCHMARKS",
    "CLASSNAMES",
    "DOMAINS",
    "GENERATOR_VERSION",
    "MAX_CLASSES",
    "TEMPLATES",
    "WorldConfig",
    "benchmark_key",
    "generate_world",
    "pool_ground_truth",
    "pool_key",
    "reference_key",
    "render_image",
]
