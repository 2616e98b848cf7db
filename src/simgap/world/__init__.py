"""The built-in miniature world: a reference set, a captioned pool and six benchmarks.

`generate_world(WorldConfig(...), out_dir)` writes the world directory described in
docs/CONTRACTS.md. `plan` decides what goes where, `render` (with `shapes`, `scene` and
`domains`) draws the images, `labelled`, `pool` and `captions` write the parts, `writer` runs it.
"""

from simgap.world.plan import BENCHMARKS, WorldConfig, benchmark_key, pool_key, reference_key
from simgap.world.pool import pool_ground_truth
from simgap.world.render import DOMAINS, render_image
from simgap.world.shapes import CLASSNAMES, MAX_CLASSES
from simgap.world.writer import GENERATOR_VERSION, TEMPLATES, generate_world

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
