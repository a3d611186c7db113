"""A test-harness mode that fails when a collective receives a tensor its backend cannot take.

On a GPU every megatron-core process group except its ``*_gloo`` ones is NCCL, which takes
tensors on the platform's device only; a tensor built without ``device=`` stays on the CPU and
makes the collective fail there. Gloo on a CPU-only machine takes anything, so the CPU tests
cannot see such a tensor by its ``device`` alone: on the CPU the default device *is* the
platform's device.

:func:`check_collective_devices` simulates NCCL on gloo by asking *how* a tensor got its
device rather than which device it is on:

* a ``TorchFunctionMode`` marks every tensor that a factory (``torch.tensor``, ``torch.zeros``,
  ...) builds without a ``device=`` argument as *unplaced*, and so is every result computed from
  an unplaced tensor; ``Tensor.to(device)``, ``Tensor.cuda()`` and factories given a device
  place a tensor (a ``*_like`` factory inherits its input's placement, as its device);
* ``torch.distributed``'s tensor collectives and p2p calls are wrapped: an unplaced tensor sent
  to a group that would be NCCL on a GPU raises :class:`UnplacedTensorError`, naming the
  collective, the group and the caller. Tensors whose creation the mode did not see (model
  parameters, gradients made by autograd) count as placed.

Object collectives (``all_gather_object``, ...) choose their device themselves and are not
checked. Only ``torch.distributed.<name>`` is wrapped (megatron-core and our code call through
it), not the functions torch.distributed uses internally.
"""

from __future__ import annotations

import contextlib
import sys
import weakref

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

TENSOR_COLLECTIVES = (
    "all_reduce", "broadcast", "reduce", "all_gather", "all_gather_into_tensor",
    "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "gather",
    "scatter", "send", "recv", "isend", "irecv",
)  # fmt: skip
# By name: the platform's CPU layer wraps these, and the mode sees the functions it wraps.
_FACTORIES = {
    "tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "linspace", "eye", "rand",
    "randn", "randint", "randperm", "empty_strided", "from_numpy",
}  # fmt: skip
_LIKE_FACTORIES = {"zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like"}
_PLACEMENTS = {"to", "cuda"}


class _TensorSet:
    """Tensors by identity (a WeakSet would compare tensors with ``==``, elementwise)."""

    def __init__(self):
        self._refs: dict[int, weakref.ref] = {}

    def add(self, tensor: torch.Tensor) -> None:
        key = id(tensor)
        self._refs[key] = weakref.ref(tensor, lambda _, key=key: self._refs.pop(key, None))

    def discard(self, tensor: torch.Tensor) -> None:
        self._refs.pop(id(tensor), None)

    def __contains__(self, tensor: torch.Tensor) -> bool:
        ref = self._refs.get(id(tensor))
        return ref is not None and ref() is tensor


class UnplacedTensorError(RuntimeError):
    """A collective received a tensor that was never put on the platform's device."""


class _Placement(TorchFunctionMode):
    """Marks tensors made without a device (and everything computed from them) unplaced."""

    def __init__(self, unplaced: _TensorSet):
        super().__init__()
        self.unplaced = unplaced

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        outputs = [t for t in tree_flatten(result)[0] if isinstance(t, torch.Tensor)]
        name = getattr(func, "__name__", "")
        if name in _FACTORIES:
            placed = kwargs.get("device") is not None
        elif name in _LIKE_FACTORIES and kwargs.get("device") is not None:
            placed = True
        elif name in _PLACEMENTS and (name == "cuda" or _names_device(args[1:], kwargs)):
            placed = True
        else:
            inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            placed = not any(t in self.unplaced for t in inputs)
        for tensor in outputs:
            if placed:
                self.unplaced.discard(tensor)
            else:
                self.unplaced.add(tensor)
        return result


def _names_device(args, kwargs) -> bool:
    if kwargs.get("device") is not None:
        return True
    return bool(args) and isinstance(args[0], str | torch.device | int)


def _checked(name: str, original, unplaced: _TensorSet, is_checked_group):
    def collective(*args, **kwargs):
        group = kwargs.get("group")
        if group is None:
            group = next((a for a in args if isinstance(a, dist.ProcessGroup)), None)
        if is_checked_group(group):
            tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            bad = [t for t in tensors if t in unplaced]
            if bad:
                caller = sys._getframe(1)
                raise UnplacedTensorError(
                    f"torch.distributed.{name} on {_group_name(group)} received a "
                    f"{tuple(bad[0].shape)} {bad[0].dtype} tensor built without a device "
                    f"(at {caller.f_code.co_filename}:{caller.f_lineno} in "
                    f"{caller.f_code.co_name}); on a GPU this group is NCCL, which takes "
                    "tensors on the platform's device only: build it with "
                    "device=platform.device()"
                )
        return original(*args, **kwargs)

    collective.__name__ = name
    return collective


def _group_name(group) -> str:
    if group is None:
        return "the default group"
    try:
        return f"a group of ranks {dist.get_process_group_ranks(group)}"
    except Exception:
        return "a process group"


def _gloo_groups() -> list:
    """megatron-core's groups that are gloo on every platform."""
    from megatron.core import parallel_state

    groups = []
    for getter in ("get_data_parallel_group_gloo", "get_expert_data_parallel_group_gloo"):
        with contextlib.suppress(Exception):
            groups.append(getattr(parallel_state, getter)())
    return [g for g in groups if g is not None]


@contextlib.contextmanager
def check_collective_devices():
    """Inside the block, a collective given an unplaced tensor on a group that would be NCCL on
    a GPU raises :class:`UnplacedTensorError` (see the module docstring)."""
    unplaced = _TensorSet()
    gloo = _gloo_groups()

    def is_checked_group(group) -> bool:
        return not any(group is g for g in gloo)

    originals = {name: getattr(dist, name) for name in TENSOR_COLLECTIVES}
    original_cuda = torch.Tensor.cuda

    def cuda(self, *args, **kwargs):
        out = original_cuda(self, *args, **kwargs)
        unplaced.discard(out)
        return out

    try:
        for name, fn in originals.items():
            setattr(dist, name, _checked(name, fn, unplaced, is_checked_group))
        torch.Tensor.cuda = cuda
        with _Placement(unplaced):
            yield unplaced
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
        torch.Tensor.cuda = original_cuda
