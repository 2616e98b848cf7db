"""The store format: names, manifest schemas and their checks, and the numerics two stores
must share to be compared."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simgap.io import (
    COUNT,
    NAME,
    POSITIVE,
    SHA256,
    Check,
    Optional,
    check_schema,
)

FORMAT = "simgap-store/1"
LINK_FORMAT = "simgap-clip-retrieval-link/1"
# What a clip-retrieval folder's model is when nobody said: scanning it against anything is refused.
UNKNOWN_MODEL: dict[str, Any] = {"arch": "unknown", "pretrained": None, "checkpoint_sha256": None}
NORM_TOLERANCE = 1e-2  # fp16 storage of a unit vector has norm within ~1e-3 of 1


class StoreError(ValueError):
    """A store on disk is missing, incomplete or inconsistent."""


# What the readers rely on in manifest.json and the done records (extra keys are allowed).
SKIPPED = Check(
    "counts by reason",
    lambda v: (
        isinstance(v, dict)
        and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in v.values())
    ),
)
SHARD_SCHEMA = {
    "name": NAME,
    "rows": COUNT,
    "sha256": SHA256,
    "skipped": Optional(SKIPPED),
    "text_sha256": Optional(SHA256),
    "keys_sha256": Optional(SHA256),  # absent in stores written before it was recorded
}
MANIFEST_SCHEMA = {
    "format": str,
    "model": dict,
    "dim": POSITIVE,
    "rows": COUNT,  # the shards must add up to it: a shard dropped from the list is caught
    "text": Optional(bool),
    "shards": [SHARD_SCHEMA],
}
LINK_SCHEMA = {"format": str, "path": str, "model": dict}
DONE_SCHEMA = {**SHARD_SCHEMA, "skipped": SKIPPED, "fingerprint": str}


def check_manifest(path: Path, manifest: Any) -> None:
    """Shape and cross-field sums of a simgap manifest, before any reader trusts it."""
    check_schema(manifest, MANIFEST_SCHEMA, str(path))
    shards = manifest["shards"]
    names = [s["name"] for s in shards]
    if len(set(names)) != len(names):
        raise StoreError(f"{path}: shards: a shard name is listed twice")
    if manifest["rows"] != sum(s["rows"] for s in shards):
        raise StoreError(f"{path}: rows: {manifest['rows']} is not the sum of the shards' rows")
    if manifest.get("text") and not all("text_sha256" in s for s in shards):
        raise StoreError(f"{path}: text: true, but a shard has no text_sha256")


@dataclass(frozen=True)
class ShardInfo:
    name: str
    rows: int
    offset: int
    sha256: str
    skipped: dict[str, int]


# What two stores must share to be compared (of simgap.models.numerics_identity). The rest
# (GPU model, SM count, library versions) changes bytes only at the level of the last rounding,
# as two CPU models do: recorded, not compared.
COMPARED_NUMERICS = ("device", "autocast", "tf32_matmul", "tf32_cudnn")


def compared_numerics(numerics: dict[str, Any] | None) -> dict[str, Any] | None:
    """The part of a store's numerics that must match for two stores to be compared."""
    if numerics is None:
        return None
    return {k: numerics[k] for k in COMPARED_NUMERICS if k in numerics}
