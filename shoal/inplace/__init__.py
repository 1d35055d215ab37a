"""In-place recovery of a collective job (``--recovery inplace``).

A lost worker does not stop the others. The launcher hosts a store (a
``TCPStore``) that outlives any worker, starts each worker on its own (one
torchrun ``PContext`` each, forked from a preloaded server) and numbers the
job's *generations*: who the members are, in which order (a member's rank is
its index), and the global step the generation starts at.

When a member is lost, the collective it was in breaks; each survivor leaves
its process group at once (which breaks the collectives of those waiting on
it), says in the store which step it last committed, and waits. Once every
living member has spoken, the launcher writes the next generation: the
survivors, plus replacements and spares that are ready, starting at the newest
committed step. A member whose all-reduce completed has the whole step (every
contribution, the lost one's included, was in it), so the step survives if any
member committed it; members behind it, and newcomers, receive the model,
optimizer, RNG and data position from a member that has it. The others redo
the step with its own samples, cut over the new membership.

Where a rank's state exists on some ranks only (``fsdp`` with replicas: each shard
on one rank of each replica), every generation has every slot filled: the others
wait for a replacement, which takes the lost worker's place and receives its shard
from a replica of it (:meth:`~shoal.strategies.plugin.Plugin.in_place_replicas`);
if every copy of a shard is lost, the workers start again from the newest
checkpoint.

A newcomer is taken in at a step boundary: every few steps the members ask the
store, all at the same step, whether one waits; the first to ask decides for
everyone (``compare_set``).

:mod:`shoal.inplace.protocol` holds what both sides read and write,
:mod:`shoal.inplace.member` the worker's side, :mod:`shoal.inplace.coordinator`
the launcher's decisions and :mod:`shoal.inplace.launch` the launcher.
"""
