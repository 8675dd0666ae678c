"""Stand-ins for a GPU on a CPU machine: a virtual accelerator that refuses cross-device ops, and op / sync counters.

:func:`virtual_device` makes ``torch.device("lazy", 0)`` behave like a CUDA device whose data lives on the CPU:

* tensors on it (``model.to(VIRTUAL)``, ``torch.zeros(..., device=x.device)``, ``x.new_ones(...)``, results of ops on
  them) are :class:`VirtualTensor` wrappers that report ``device == VIRTUAL`` and compute on their CPU payload, so
  data-dependent code (``nonzero``, ``.item()``, boolean indexing) runs for real — what the ``meta`` device cannot do;
* an op that mixes the virtual device with a CPU tensor raises :class:`CrossDeviceError`, with CUDA's exceptions:
  0-dim CPU tensors (CPU scalars), CPU indices for indexing a device tensor, and copies between devices;
* every host-device synchronisation a CUDA run would pay is recorded in :attr:`VirtualDevice.syncs`: reading a
  device value on the host (``.item()``, ``bool()``/``int()``/``float()``, ``.tolist()``, ``.numpy()``, copies to the
  CPU, ``torch.equal``) and ops whose output size depends on device data (``nonzero``, boolean-mask indexing,
  ``masked_select``, ``unique``, ``repeat_interleave`` by a tensor).

:func:`count_ops` counts the aten ops dispatched inside a block (on CUDA, each one is about one kernel launch).

The device type ``lazy`` is used because this CPU build registers a device guard for it (indexing works) and creating
a tensor on it does not try to initialise a runtime. Nothing here touches model code: it is the same code path a user
runs on CUDA.
"""

from __future__ import annotations

import contextlib
import traceback
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

VIRTUAL = torch.device("lazy", 0)

aten = torch.ops.aten
#: ops whose result the host must wait for (a value read back, or an output size that depends on device data)
_SYNC_OPS = {
    aten._local_scalar_dense.default,
    aten.is_nonzero.default,
    aten.equal.default,
    aten.nonzero.default,
    aten.nonzero_static.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
    aten.repeat_interleave.Tensor,
    aten.argwhere.default,
}
#: ops that may take CPU index tensors for a device ``self`` (CUDA moves them)
_INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
#: ops that legitimately move data between devices
_TRANSFER_OPS = {aten._to_copy.default, aten.copy_.default, aten._copy_from.default, aten._copy_from_and_resize.default}


class CrossDeviceError(RuntimeError):
    """An op mixed tensors of the virtual device and the CPU (CUDA would refuse it)."""


class VirtualTensor(torch.Tensor):
    """A tensor on the virtual device; its data is the CPU tensor ``payload``."""

    payload: torch.Tensor

    @staticmethod
    def __new__(cls, payload: torch.Tensor) -> VirtualTensor:
        out = torch.Tensor._make_wrapper_subclass(
            cls, payload.shape, strides=payload.stride(), storage_offset=payload.storage_offset(), dtype=payload.dtype,
            device=VIRTUAL, requires_grad=payload.requires_grad, layout=payload.layout,
        )
        out.payload = payload
        return out

    __torch_function__ = torch._C._disabled_torch_function_impl

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"VirtualTensor({self.payload!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"{func} ran on a virtual-device tensor outside kvcompress.device_probe.virtual_device()")


def _is_virtual(x: Any) -> bool:
    return isinstance(x, torch.device) and x.type == VIRTUAL.type or isinstance(x, str) and x.startswith(VIRTUAL.type)


def _where() -> str:
    """The innermost frame of kvcompress (or the caller) that issued the current op: ``file:line``."""
    frames = [f for f in traceback.extract_stack()[:-3]
              if "/torch/" not in f.filename and "device_probe" not in f.filename]
    ours = [f for f in frames if "kvcompress" in f.filename or "/methods/" in f.filename or "/eval/" in f.filename]
    f = (ours or frames or [None])[-1]
    return f"{f.filename.rsplit('/', 2)[-2]}/{f.filename.rsplit('/', 1)[-1]}:{f.lineno}" if f else "?"


@dataclass
class VirtualDevice:
    """What :func:`virtual_device` recorded: host-device synchronisations as ``(what, where)``."""

    syncs: list[tuple[str, str]] = field(default_factory=list)
    track: bool = True

    def sync(self, what: str) -> None:
        if self.track:
            self.syncs.append((what, _where()))

    @contextlib.contextmanager
    def counting(self) -> Iterator[list[tuple[str, str]]]:
        """Syncs recorded inside the block (a fresh list)."""
        start = len(self.syncs)
        window: list[tuple[str, str]] = []
        try:
            yield window
        finally:
            window.extend(self.syncs[start:])


class _Dispatch(TorchDispatchMode):
    def __init__(self, state: VirtualDevice):
        super().__init__()
        self.state = state

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, _ = tree_flatten((args, kwargs))
        virtual = cpu = False
        for a in flat:
            if isinstance(a, VirtualTensor):
                virtual = True
            elif isinstance(a, torch.Tensor) and not (a.dim() == 0 and a.device.type == "cpu"):
                cpu = True
        if virtual and cpu and func not in _TRANSFER_OPS:
            if not (func in _INDEX_OPS and isinstance(args[0], VirtualTensor)
                    and not any(isinstance(a, torch.Tensor) and not isinstance(a, VirtualTensor) and a.dim()
                                for a in args[2:])):
                devices = sorted({"cpu" if not isinstance(a, VirtualTensor) else "virtual"
                                  for a in flat if isinstance(a, torch.Tensor)})
                raise CrossDeviceError(f"cross-device op {func} ({' + '.join(devices)}) at {_where()}")
        if virtual and func in _SYNC_OPS:
            self.state.sync(func.__name__.split(".")[0])
        elif virtual and func in _INDEX_OPS and any(
            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in tree_flatten(args[1])[0]
        ):
            self.state.sync("boolean-mask indexing")  # the kernel runs nonzero on the mask
        target = kwargs.get("device")
        on_virtual = virtual if target is None else _is_virtual(target)
        if func is aten._to_copy.default and virtual and not on_virtual:
            self.state.sync("copy to host")
        if func is aten.copy_.default and isinstance(args[1], VirtualTensor) and not isinstance(args[0], VirtualTensor):
            self.state.sync("copy to host")
        unwrap = lambda x: x.payload if isinstance(x, VirtualTensor) else x  # noqa: E731
        cpu_args = tree_map(unwrap, args)
        cpu_kwargs = tree_map(unwrap, kwargs)
        if target is not None and _is_virtual(target):
            cpu_kwargs["device"] = torch.device("cpu")
        out = func(*cpu_args, **cpu_kwargs)
        schema = func._schema
        if schema.arguments and schema.arguments[0].alias_info is not None and schema.arguments[0].alias_info.is_write:
            return args[0]  # in-place: the same wrapper
        if not on_virtual:
            return out
        wrap = lambda o: VirtualTensor(o) if isinstance(o, torch.Tensor) and not isinstance(o, VirtualTensor) else o  # noqa: E731
        return tree_map(wrap, out)


class _Functions(TorchFunctionMode):
    """Python-level entry points that bypass dispatch: ``torch.tensor(..., device=)`` and host reads."""

    def __init__(self, state: VirtualDevice):
        super().__init__()
        self.state = state

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.tensor, torch.as_tensor, torch.asarray) and _is_virtual(kwargs.get("device")):
            data = args[0] if args else kwargs.get("data")
            if isinstance(data, VirtualTensor):
                return data.to(dtype=kwargs.get("dtype") or data.dtype)
            return VirtualTensor(func(*args, **{**kwargs, "device": "cpu"}))
        host_reads = (torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.__array__)
        if func in host_reads and args and isinstance(args[0], VirtualTensor):
            self.state.sync(func.__name__)
            return func(args[0].payload, *args[1:], **kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def virtual_device() -> Iterator[VirtualDevice]:
    """Run the block with :data:`VIRTUAL` standing in for a CUDA device (see the module docstring)."""
    state = VirtualDevice()
    with _Functions(state), _Dispatch(state):
        yield state


def to_cpu(x: Any) -> Any:
    """The CPU payload of a virtual tensor (any nesting of lists/tuples/dicts), for comparisons outside the block."""
    return tree_map(lambda t: t.payload if isinstance(t, VirtualTensor) else t, x)


#: ops that only allocate or describe memory: no kernel runs for them on an accelerator
_NO_KERNEL = {aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default, aten._unsafe_view.default,
              aten.lift_fresh.default, aten.result_type.Tensor, aten.result_type.Scalar, aten.result_type.Scalar_Tensor}


def launches_kernel(func: Any) -> bool:
    """Whether an aten op runs a kernel on an accelerator: not a view (its result aliasing an input without writing
    it), not a bare allocation."""
    returns = func._schema.returns
    view = bool(returns) and returns[0].alias_info is not None and not returns[0].alias_info.is_write
    return not view and func not in _NO_KERNEL and func not in (aten.detach.default, aten.alias.default)


class _OpCounter(TorchDispatchMode):
    def __init__(self, counts: Counter, kernels_only: bool):
        super().__init__()
        self.counts, self.kernels_only = counts, kernels_only

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if launches_kernel(func) if self.kernels_only else func not in (aten.detach.default, aten.alias.default):
            self.counts[func.__name__] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_ops(kernels_only: bool = False) -> Iterator[Counter]:
    """Count the aten ops dispatched in the block (below autograd, composite ops already decomposed), by name: the
    ``Counter``'s total is the op count. ``kernels_only``: only ops that run a kernel on an accelerator (views and
    bare allocations left out) — about the kernel launches of the block on CUDA."""
    counts: Counter = Counter()
    with _OpCounter(counts, kernels_only):
        yield counts
