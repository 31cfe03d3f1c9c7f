"""Counts the host syncs a step would make on an accelerator, while it runs on the CPU.

On the CPU every tensor is a host tensor, so the counter tracks which tensors *would* live on the
device: the ones given to it (the model's parameters, the classifier's rows), every tensor a factory
makes with an explicit ``device=`` (except draws from a generator it is told is the host's), every
upload's result, and every result of an op with such an input (a :class:`TorchDispatchMode`
propagates the mark through views and in-place writes). It and a :class:`TorchFunctionMode` count,
by kind:

- ``tolist``, ``numpy``, ``cpu``, ``__array__`` of a device tensor, and ``item`` (every
  ``_local_scalar_dense``: ``item``, ``__bool__``, ``__float__``, ``__int__`` ...): a device → host read;
- ``nonzero``, ``unique``, ``masked_select``, ``bool_index`` (indexing with a mask) on device tensors:
  ops whose output shape the host must wait for;
- ``upload``: host data put on the device by a blocking copy (``.to(device)`` without
  ``non_blocking=True``, ``torch.tensor``/``torch.as_tensor`` with a ``device``);
- ``wait``: a host read of a host tensor that a non-blocking device → host copy
  (``host.copy_(device_tensor, non_blocking=True)``) filled in the same block: the host waits for
  that copy. Read in a later block (a later step), the copy is long done and nothing is counted.

On the CPU the host and the device are one ``torch.device``, so the code under test must name them
apart: the device by a ``torch.device`` (or a tensor's ``.device``), the host by the string
``"cpu"`` or ``.cpu()``. ``.to("cpu")`` of host data is no upload; a download must be spelled
``.cpu()``/``.numpy()``/``.tolist()`` (``.to(device)`` of a device tensor is the no-op it is there).
An upload on the CPU returns its source, which is then marked too (counting more, never less).
"""
from __future__ import annotations

import traceback
from collections import Counter
from typing import Iterable

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakTensorKeyDictionary

aten = torch.ops.aten

_HOST_READS = {"tolist", "numpy", "cpu", "__array__"}
_SHAPE_OPS = {aten.nonzero: "nonzero", aten.masked_select: "masked_select", aten._unique: "unique",
              aten._unique2: "unique", aten.unique_dim: "unique", aten.unique_consecutive: "unique",
              aten.unique_dim_consecutive: "unique"}
_INDEX_OPS = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}
_FACTORIES = {"zeros", "ones", "empty", "full", "arange", "linspace", "rand", "randn", "randint",
              "randperm", "eye"}
_UPLOADS = {"to", "cuda", "tensor", "as_tensor", "asarray", "new_tensor"}


def _site() -> str:
    """The innermost frame of the code under test (not torch's, not this file's), as ``file:line``."""
    for frame in reversed(traceback.extract_stack()):
        if "/torch/" not in frame.filename and not frame.filename.endswith("sync_counter.py"):
            return f"{frame.filename.rsplit('/', 2)[-2]}/{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}"
    return "?"


class Tally(Counter):
    """Syncs by kind; ``sites`` has them by ``(kind, file:line)`` (to say where they are)."""

    def __init__(self):
        super().__init__()
        self.sites: Counter = Counter()

    def add(self, kind: str) -> None:
        self[kind] += 1
        self.sites[kind, _site()] += 1


class _Marks:
    """Which tensors live on the (pretended) device."""

    def __init__(self):
        self._marked = WeakTensorKeyDictionary()

    def mark(self, t) -> None:
        if isinstance(t, torch.Tensor):
            self._marked[t] = True
            if t._base is not None:
                self._marked[t._base] = True

    def unmark(self, t) -> None:
        self._marked.pop(t, None)

    def __contains__(self, t) -> bool:
        return isinstance(t, torch.Tensor) and (t in self._marked or (t._base is not None and t._base in self._marked))


class _Propagate(TorchDispatchMode):
    """Marks every result (and every written argument) of an op with a device input; counts the ops
    whose output shape depends on device values."""

    def __init__(self, marks: _Marks, counts: Tally):
        super().__init__()
        self.marks, self.counts = marks, counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        on_device = any(t in self.marks for t in inputs)
        if on_device:
            packet = func.overloadpacket
            if packet in _SHAPE_OPS:
                self.counts.add(_SHAPE_OPS[packet])
            elif packet in _INDEX_OPS and any(t.dtype in (torch.bool, torch.uint8) for t in inputs[1:]):
                self.counts.add("bool_index")
            elif packet is aten._local_scalar_dense:
                self.counts.add("item")
        out = func(*args, **kwargs)
        if on_device:
            for t in tree_flatten(out)[0]:
                self.marks.mark(t)
            for arg, value in zip(func._schema.arguments, args):
                if arg.alias_info is not None and arg.alias_info.is_write:
                    self.marks.mark(value)
        return out


def _target_device(func_name: str, args, kwargs):
    """The device a ``.to``/factory/upload call names, or None."""
    if "device" in kwargs and kwargs["device"] is not None:
        return kwargs["device"]
    if func_name == "cuda":
        return "cuda"
    if func_name == "to":
        for a in args[1:]:
            if isinstance(a, (str, torch.device)):
                return a
            if isinstance(a, torch.Tensor):
                return a.device
    return None


class _Count(TorchFunctionMode):
    def __init__(self, marks: _Marks, counts: Tally, host_generators: list):
        super().__init__()
        self.marks, self.counts, self.host_generators = marks, counts, host_generators
        self.in_flight = WeakTensorKeyDictionary()  # host tensors a non-blocking download fills

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        source = args[0] if args else kwargs.get("data")
        if name in _HOST_READS and source in self.marks:
            self.counts.add(name)
        elif name in _HOST_READS and isinstance(source, torch.Tensor) and source in self.in_flight:
            self.counts.add("wait")
        download = (name == "copy_" and source not in self.marks and args[1] in self.marks
                    and (kwargs.get("non_blocking") or args[2:3] == (True,)))
        out = func(*args, **kwargs)
        if download:
            self.marks.unmark(source)
            self.in_flight[source] = True
        device = _target_device(name, args, kwargs)
        if isinstance(device, str) and device == "cpu":   # the host, named as such
            device = None
        if name in _UPLOADS and device is not None and source not in self.marks:
            if name in ("tensor", "as_tensor", "asarray", "new_tensor") or not kwargs.get("non_blocking", False):
                self.counts.add("upload")
            self.marks.mark(out)
        elif name in _FACTORIES and device is not None and not any(
                kwargs.get("generator") is g for g in self.host_generators):
            self.marks.mark(out)
        return out


class SyncCounter:
    """``with SyncCounter(device_tensors, host_generators) as counts:`` → ``counts`` (a
    :class:`Tally`) of the block; what ``host_generators`` draw stays on the host."""

    def __init__(self, device_tensors: Iterable[torch.Tensor], host_generators: Iterable[torch.Generator] = ()):
        self.marks, self.counts = _Marks(), Tally()
        for t in device_tensors:
            self.marks.mark(t)
        self._modes = (_Count(self.marks, self.counts, list(host_generators)),
                       _Propagate(self.marks, self.counts))

    def __enter__(self) -> Tally:
        for mode in self._modes:
            mode.__enter__()
        return self.counts

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
