"""Memory accounting per rank: parameters, gradients, optimizer state, activations.

Parameter, gradient and optimizer-state bytes are what this rank holds: a
sharded tensor (a ``DTensor`` under FSDP or tensor parallelism) counts its
local shard only. Activation bytes are measured, not estimated: while a step's
forward runs, :class:`ActivationMeter` sees every tensor autograd saves for
backward (``torch.autograd.graph.saved_tensors_hooks``) and follows it until
autograd lets it go, so its peak is the most activation memory held at once,
on any device, microbatches in flight included. Parameters that autograd saves
are not activations and are left out; each storage counts once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The part of ``t`` this rank holds (a DTensor's local shard, or ``t``)."""
    local = getattr(t, "_local_tensor", None)
    return local if isinstance(local, torch.Tensor) else t


def nbytes(t: torch.Tensor | None) -> int:
    if t is None:
        return 0
    local = local_tensor(t)
    return local.numel() * local.element_size()


def state_bytes(
    params: Iterable[torch.nn.Parameter], optimizer: torch.optim.Optimizer | None
) -> dict[str, int]:
    """Bytes of parameters, gradients and optimizer state on this rank."""
    params = list(params)
    optim = 0
    if optimizer is not None:
        for state in optimizer.state.values():
            optim += sum(nbytes(v) for v in state.values() if isinstance(v, torch.Tensor))
    return {
        "params": sum(nbytes(p) for p in params),
        "grads": sum(nbytes(p.grad) for p in params),
        "optimizer": optim,
    }


class _Held:
    """A saved tensor, counted while autograd keeps it."""

    __slots__ = ("key", "meter", "tensor")

    def __init__(self, meter: ActivationMeter, tensor: torch.Tensor, key: int, size: int) -> None:
        self.meter, self.tensor, self.key = meter, tensor, key
        meter._add(key, size)

    def __del__(self) -> None:
        self.meter._drop(self.key)


class ActivationMeter:
    """The peak bytes of activations saved for backward; see the module docstring."""

    def __init__(self) -> None:
        self.live: dict[int, list[int]] = {}  # storage pointer -> [references, bytes]
        self.current = 0
        self.peak = 0
        self.enabled = True
        """Off, :meth:`measure` does nothing: the trainer measures one step per log
        window (a step's activations are the same from step to step)."""

    def _add(self, key: int, size: int) -> None:
        entry = self.live.setdefault(key, [0, size])
        if entry[0] == 0:
            self.current += size
            self.peak = max(self.peak, self.current)
        entry[0] += 1

    def _drop(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.current -= entry[1]
            del self.live[key]

    def _pack(self, t: torch.Tensor) -> Any:
        if t.is_leaf and t.requires_grad:  # a parameter (or its gathered copy)
            return t
        local = local_tensor(t)
        storage = local.untyped_storage()
        if storage.nbytes() == 0:
            return t
        return _Held(self, t, storage.data_ptr(), storage.nbytes())

    @staticmethod
    def _unpack(held: Any) -> torch.Tensor:
        return held.tensor if isinstance(held, _Held) else held

    @contextlib.contextmanager
    def measure(self) -> Iterator[None]:
        """Count what autograd saves inside this block (while :attr:`enabled`)."""
        if not self.enabled:
            yield
            return
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            yield

    def take_peak(self) -> int:
        """The peak since the last call; the next window starts from what is held now."""
        peak, self.peak = self.peak, self.current
        return peak


MEMORY_FIELDS = ("params", "grads", "optimizer", "activations_peak", "private")
"""The per-rank memory figures, in bytes, in this order in gathered rows. ``private``
is the whole process's (:func:`private_bytes`)."""


def private_bytes() -> int:
    """This process's private memory: resident pages no file backs (``RssAnon`` plus
    ``RssShmem`` of ``/proc/self/status``), so a memory-mapped dataset's pages, which
    the kernel can drop and re-read, do not count. 0 where ``/proc`` is missing."""
    total = 0
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("RssAnon:", "RssShmem:")):
                    total += int(line.split()[1]) * 1024
    except OSError:
        return 0
    return total
