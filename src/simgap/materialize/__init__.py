"""Materialize: a split (:mod:`simgap.select.splitfile`) or key list -> new training shards.

It runs in two parallel phases through the executor:

1. index, one task per input shard: walk the tar's headers (one sequential read,
   :class:`simgap.data.tars.TarWalk`), note where each member of a kept sample lies (offset,
   size); unsafe members (absolute, ``..``, links, devices) are skipped and counted, a cut or
   damaged tar keeps what precedes the damage and counts the rest;
2. write, one task per output shard: copy the kept members' bytes by offset into a reproducible
   tar, one sample at a time. Output shards hold ``shard_size`` samples each (resharded across
   input boundaries), or mirror the input shards when ``shard_size`` is None: then one task
   indexes and writes its shard (the input is read once), and only shards that hold a key kept
   in an earlier shard are rewritten afterwards.

Each task leaves a done record tied to its inputs, written after its tar is fsync'd (a done
record never points at data a power cut could lose), so a killed run resumes where it stopped.
The reference set's shards are tasks too. IO-heavy, so ``simgap materialize`` runs tasks on
threads (:class:`simgap.parallel.ThreadEngine`). Archive members are never extracted: the only
files written are the output folder's own.

Modules: ``index`` (phase 1), ``write`` (phase 2 and the plan), ``reference`` (the reference
set's shards), ``run`` (``materialize``, the two phases on the executor).
"""

from simgap.materialize.run import materialize

__all__ = ["materialize"]
