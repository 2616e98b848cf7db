"""Split policies: gap-matched, near/far/random, coreset."""

from simgap.select.policies import (
    far_pruned,
    gapmatch,
    near_pruned,
    random_split,
    resolve_size,
    union_score,
)

__all__ = ["far_pruned", "gapmatch", "near_pruned", "random_split", "resolve_size", "union_score"]
