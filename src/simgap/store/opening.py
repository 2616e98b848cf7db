"""Opening any store kind: a simgap store, a clip-retrieval link, or a clip-retrieval folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from simgap.io import check_schema, read_json
from simgap.store.clip_retrieval import ClipRetrievalStore, is_clip_retrieval
from simgap.store.format import FORMAT, LINK_FORMAT, LINK_SCHEMA, StoreError, check_manifest
from simgap.store.reader import Store


def open_store(path: Path | str, model: dict[str, Any] | None = None) -> Store:
    """Open a simgap store, a link to a clip-retrieval folder, or a clip-retrieval folder itself
    (``model`` then names the model that made it; unknown if not given)."""
    path = Path(path)
    if not path.is_dir():
        raise StoreError(f"{path}: no such store folder")
    manifest_path = path / "manifest.json"
    if not manifest_path.exists():
        if is_clip_retrieval(path):
            return ClipRetrievalStore(path, model)
        raise StoreError(f"{path}: not a finished embedding store (no manifest.json)")
    manifest = read_json(manifest_path, {"format": str})
    if manifest["format"] == LINK_FORMAT:
        check_schema(manifest, LINK_SCHEMA, str(manifest_path))
        return ClipRetrievalStore(Path(manifest["path"]), model or manifest["model"])
    if manifest["format"] != FORMAT:
        raise StoreError(f"{manifest_path}: unknown store format {manifest['format']!r}")
    check_manifest(manifest_path, manifest)
    return Store(path, manifest)
