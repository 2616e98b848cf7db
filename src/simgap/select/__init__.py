"""Split policies: gap-matched, near/far/random, coreset, semdedup, image-based."""

from simgap.select.image_based import image_based
from simgap.select.policies import (
    coreset,
    far_pruned,
    gapmatch,
    near_pruned,
    random_split,
    resolve_size,
    union_score,
)
from simgap.select.semdedup import semdedup

__all__ = [
    "coreset",
    "far_pruned",
    "gapmatch",
    "image_based",
    "near_pruned",
    "random_split",
    "resolve_size",
    "semdedup",
    "union_score",
]
