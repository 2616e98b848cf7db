"""The contamination audit: which test points have a near-duplicate in a base set (by embedding
similarity, or verified on pixels). A measurement of a run's data, not a selection policy: it
makes no split."""

from simgap.audit.contamination import audit, store_name

__all__ = ["audit", "store_name"]
