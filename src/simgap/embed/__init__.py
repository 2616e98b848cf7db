"""Source → embedding store, one shard task at a time, resumable.

``EmbedShard`` is the worker: a frozen, picklable callable that streams one shard task's samples,
decodes and transforms their images (in ``decode_workers`` processes, ahead of the model),
runs the similarity model batch by batch, and writes the store shard atomically with a done
record last. ``embed`` plans the tasks, skips those already done from the same input and model,
runs the rest on an executor and writes the manifest.

A clip-retrieval folder as source is not re-embedded: ``embed`` records the model the user names
for it in a link store that reads the folder in place.

Modules: ``encode`` (the forward and its numerics), ``batches`` (reading and decoding),
``shard`` (``EmbedShard``), ``run`` (``embed``).
"""

from simgap.embed.run import embed

__all__ = ["embed"]
