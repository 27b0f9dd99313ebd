"""Measuring the memory a piece of code allocates, on any device including the CPU.

`TensorProbe` watches every tensor an operator creates inside its block (a `TorchDispatchMode`):
the peak of the bytes they hold at once, and the largest float32 tensor among them. The
project's rule, no `[batch, length, vocab]` float32 tensor (docs/memory.md), is checked with it in
the tests, and `make bench` prints its peaks. It counts what operators allocate (activations,
logits, temporaries), not weights that already existed, and a tensor's bytes until the tensor
object is gone (a view that outlives its base is not counted).
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class TensorProbe(TorchDispatchMode):
    """`with TensorProbe() as probe: ...`, then `probe.peak_bytes`, `probe.largest_float32`
    (elements) and `probe.largest_float32_shape`."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak_bytes = 0
        self.largest_float32 = 0
        self.largest_float32_shape: tuple = ()
        self._held: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        if t.dtype == torch.float32 and t.numel() > self.largest_float32:
            self.largest_float32, self.largest_float32_shape = t.numel(), tuple(t.shape)
        key = t.untyped_storage().data_ptr()
        if key == 0 or key in self._held:  # a view, or an in-place result
            return
        nbytes = t.untyped_storage().nbytes()
        self._held[key] = nbytes
        self.live += nbytes
        self.peak_bytes = max(self.peak_bytes, self.live)
        weakref.finalize(t, self._free, key)

    def _free(self, key: int) -> None:
        self.live -= self._held.pop(key, 0)
