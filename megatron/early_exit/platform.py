"""The one module that knows CPU/gloo from CUDA/NCCL.

Everything else in EE-LLM asks this module for its device, its distributed backend and the config
overrides the platform needs; nothing else names an accelerator.

CPU compatibility mechanism (only installed by :func:`initialize` / :func:`install_cpu_compat`
when no CUDA device exists; importing this module changes nothing):

* megatron-core 0.16.1 hard-codes CUDA in four ways on the paths we use: ``torch.cuda``
  entry points (``current_device()`` as a ``device=`` argument, ``synchronize``, streams, events,
  RNG state), literal ``device="cuda"`` in factory calls (pipeline schedules, optimizer, grad
  clipping), ``Tensor.type() == 'torch.cuda.FloatTensor'`` assertions in the optimizer, and RNG
  setters that are *silent no-ops* on a CPU-only build (``_lazy_call``), which would make every
  RNG tracker stream identical.
* We make "cuda" mean "the CPU": ``torch.cuda`` stubs (``current_device`` -> cpu, RNG -> the CPU
  generator, dummy streams/events), factory wrappers that remap ``device="cuda"``, a
  ``Tensor.type()`` answer given only to callers inside ``megatron.core``, and working replacements
  for megatron's ``_get/_set_cuda_rng_state``. Factory wrapping (not a TorchFunctionMode) because
  it is global, works inside backward and in threads, and costs almost nothing.
* ``torch._dynamo`` is imported before patching and every patched attribute gets its own function
  object: dynamo's rule table asserts on shared or pre-patched objects. torch's device-context
  table of factory functions is filled before patching too, so ``with torch.device("meta")``
  still applies to the wrapped factories.

See ``shared/reference/megatron-core-on-cpu.md`` for the full site list; ``tests/unit`` verifies
each claim this module relies on.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

from megatron.early_exit.launch import free_port

_CPU_COMPAT_INSTALLED = False


def has_cuda() -> bool:
    """True when a CUDA device is usable."""
    return torch.cuda.is_available()


def device() -> torch.device:
    """The device this process computes on."""
    if has_cuda():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def distributed_backend() -> str:
    """The torch.distributed backend for this platform."""
    return "nccl" if has_cuda() else "gloo"


def has_transformer_engine() -> bool:
    """True when Transformer Engine is importable *and* a CUDA device exists to run it."""
    if not has_cuda():
        return False
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return True


def synchronize() -> None:
    """Wait for queued device work (a no-op on CPU)."""
    if has_cuda():
        torch.cuda.synchronize()


def reset_peak_memory() -> None:
    """Start a new peak-memory measurement window (device memory on GPU, nothing on CPU)."""
    if has_cuda():
        torch.cuda.reset_peak_memory_stats()


def peak_memory_bytes() -> int:
    """Peak device memory on GPU; peak resident set size of the process on CPU."""
    if has_cuda():
        return int(torch.cuda.max_memory_allocated())
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def config_overrides() -> dict[str, Any]:
    """TransformerConfig fields this platform requires.

    On CPU: initialise on the CPU (which also makes TP layouts share the logical weights), keep
    every fusion off (they need TE/Apex or compile through inductor), and use per-op p2p (gloo
    matches batched send/recv to one peer in posting order, which swaps tensors).
    """
    if has_cuda():
        return {}
    return {
        "use_cpu_initialization": True,
        "gradient_accumulation_fusion": False,
        "bias_activation_fusion": False,
        "bias_dropout_fusion": False,
        "masked_softmax_fusion": False,
        "apply_rope_fusion": False,
        "cross_entropy_loss_fusion": False,
        "persist_layer_norm": False,
        "batch_p2p_comm": False,
    }


# --------------------------------------------------------------------------------------------
# CPU compatibility layer
# --------------------------------------------------------------------------------------------


def _is_cuda_device(dev: Any) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    return isinstance(dev, int) and not isinstance(dev, bool)  # a bare int means cuda:<int>


def _cpu_kwargs(kwargs: dict) -> dict:
    if kwargs.get("device") is not None and _is_cuda_device(kwargs["device"]):
        kwargs["device"] = "cpu"
    if kwargs.get("pin_memory"):
        kwargs["pin_memory"] = False
    return kwargs


class _CpuStream:
    """Stand-in for ``torch.cuda.Stream``: work on CPU is already ordered."""

    device = torch.device("cpu")

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def record_event(self, *args, **kwargs):
        event = _CpuEvent()
        event.record()
        return event


class _CpuEvent:
    """Stand-in for ``torch.cuda.Event`` that measures wall time."""

    def __init__(self, *args, **kwargs):
        self._time = None

    def record(self, *args, **kwargs):
        self._time = time.perf_counter()

    def wait(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, end: _CpuEvent) -> float:
        return (end._time - self._time) * 1e3


_FACTORIES = (
    "zeros", "ones", "empty", "full", "tensor", "as_tensor", "arange", "linspace", "eye", "rand",
    "randn", "randint", "randperm", "zeros_like", "ones_like", "empty_like", "full_like",
    "rand_like", "randn_like", "empty_strided",
)  # fmt: skip
_TENSOR_FACTORIES = ("new_zeros", "new_ones", "new_empty", "new_full", "new_tensor")


def _wrap_factory(fn):
    def factory(*args, **kwargs):
        return fn(*args, **_cpu_kwargs(kwargs)) if kwargs else fn(*args)

    factory.__name__ = fn.__name__
    return factory


def _wrap_tensor_factory(fn):
    def factory(self, *args, **kwargs):
        return fn(self, *args, **_cpu_kwargs(kwargs))

    factory.__name__ = fn.__name__
    return factory


def _patch_torch_cuda() -> None:
    # Every attribute gets its own function object: dynamo asserts on shared ones.
    cuda = torch.cuda
    cuda.current_device = lambda: torch.device("cpu")
    cuda.set_device = lambda *a, **k: None
    cuda.synchronize = lambda *a, **k: None
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = lambda seed: None  # torch.manual_seed calls it: must not recurse
    cuda.Stream, cuda.Event = _CpuStream, _CpuEvent
    cuda.current_stream = lambda *a, **k: _CpuStream()
    cuda.default_stream = lambda *a, **k: _CpuStream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.nvtx.range_push = lambda *a, **k: None
    cuda.nvtx.range_pop = lambda *a, **k: None
    cuda.nvtx.range = lambda *a, **k: contextlib.nullcontext()


def _patch_torch_tensors() -> None:
    tensor_cls = torch.Tensor
    tensor_cls.cuda = lambda self, *a, **k: self
    tensor_cls.pin_memory = lambda self, *a, **k: self
    tensor_cls.record_stream = lambda self, *a, **k: None
    for name in _FACTORIES:
        setattr(torch, name, _wrap_factory(getattr(torch, name)))
    for name in _TENSOR_FACTORIES:
        setattr(tensor_cls, name, _wrap_tensor_factory(getattr(tensor_cls, name)))

    original_to = tensor_cls.to

    def to(self, *args, **kwargs):
        if args and _is_cuda_device(args[0]):
            args = ("cpu",) + args[1:]
        return original_to(self, *args, **_cpu_kwargs(kwargs))

    tensor_cls.to = to

    original_type = tensor_cls.type

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        # megatron's optimizer asserts param.type() == 'torch.cuda.FloatTensor'; answer that only
        # to megatron.core frames so every other caller sees the truth.
        if dtype is None and not kwargs:
            name = original_type(self)
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if self.device.type == "cpu" and caller.startswith("megatron.core"):
                return name.replace("torch.", "torch.cuda.", 1)
            return name
        return original_type(self, dtype, non_blocking, **kwargs)

    tensor_cls.type = type_


class _DropCpuRngWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        # On CPU the "GPU" RNG *is* the CPU generator, so every tracker fork changes it.
        return "CPU RNG state changed" not in record.getMessage()


def _patch_megatron_rng() -> None:
    import megatron.core.tensor_parallel.random as mrandom

    # The originals queue a _lazy_call that never runs on a CPU build (silent no-op).
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    logging.getLogger(mrandom.__name__).addFilter(_DropCpuRngWarning())


def install_cpu_compat() -> bool:
    """Make megatron-core run on a CPU-only torch build. Idempotent; a no-op when CUDA exists.

    Returns True when the layer is (now) installed.
    """
    global _CPU_COMPAT_INSTALLED
    if has_cuda():
        return False
    if _CPU_COMPAT_INSTALLED:
        return True
    import megatron.core  # noqa: F401  (import while torch is still unpatched)
    import torch._dynamo  # noqa: F401  (build dynamo's rule table from the original functions)
    import torch.utils._device

    # ``with torch.device(...)`` recognises factories through an lru_cached set of the original
    # functions; filled after patching it would hold our wrappers, and meta-device contexts
    # (transformers' from_pretrained) would silently build CPU tensors instead.
    torch.utils._device._device_constructors()

    _patch_torch_cuda()
    _patch_torch_tensors()
    _patch_megatron_rng()
    _CPU_COMPAT_INSTALLED = True
    return True


def cpu_compat_installed() -> bool:
    """True once :func:`install_cpu_compat` has patched this process."""
    return _CPU_COMPAT_INSTALLED


# --------------------------------------------------------------------------------------------
# Distributed initialisation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParallelLayout:
    """The parallel sizes and this process's position in them."""

    world_size: int
    rank: int
    tensor_model_parallel_size: int
    pipeline_model_parallel_size: int
    data_parallel_size: int
    tensor_model_parallel_rank: int
    pipeline_model_parallel_rank: int
    data_parallel_rank: int


def _init_process_group(timeout_s: float) -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "WORLD_SIZE" not in os.environ and "MASTER_PORT" not in os.environ:
        # A plain single process: any free port, so two such jobs can run side by side.
        os.environ["MASTER_PORT"] = str(free_port())
    os.environ.setdefault("MASTER_PORT", "29500")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    if has_cuda():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    timeout = datetime.timedelta(seconds=timeout_s)
    if _is_loopback(os.environ["MASTER_ADDR"]):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # gloo's pair sockets stay local too
    store = _rendezvous_store(timeout)
    if store is None:  # torchrun (or the user) provides the rendezvous
        dist.init_process_group(backend=distributed_backend(), timeout=timeout)
        return
    dist.init_process_group(
        backend=distributed_backend(),
        store=store,
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        timeout=timeout,
    )


def _is_loopback(address: str) -> bool:
    import ipaddress

    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _rendezvous_store(timeout: datetime.timedelta):
    """The process group's key-value store, opening no socket it does not need.

    * One process: an in-memory ``HashStore`` (no socket at all).
    * Several processes and MASTER_ADDR on this host's loopback (our launcher, the tests): a
      ``TCPStore`` whose server listens on MASTER_ADDR only (torch's own binds every interface).
    * Anything else (torchrun with its own store, a cluster address): None, torch's default.
    """
    import socket

    import torch.distributed as dist

    if int(os.environ["WORLD_SIZE"]) == 1:
        return dist.HashStore()
    address, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    if os.environ.get("TORCHELASTIC_RUN_ID") or not _is_loopback(address):
        return None
    is_master = int(os.environ["RANK"]) == 0
    listen_fd = None
    if is_master:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((address, port))
        listener.listen(128)
        listen_fd = listener.detach()  # the store owns the socket from here on
    return dist.TCPStore(
        address, port, int(os.environ["WORLD_SIZE"]), is_master, timeout,
        master_listen_fd=listen_fd,
    )  # fmt: skip


def initialize(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    *,
    seed: int = 1234,
    embedding_stages: frozenset[int] | None = None,
    timeout_s: float = 600.0,
) -> ParallelLayout:
    """Set up this process: platform compatibility, process group, parallel groups, RNG.

    Works under ``torchrun`` (reads RANK/WORLD_SIZE/MASTER_*), under a test spawner that sets the
    same variables, and as a plain single process.

    Args:
        embedding_stages: pipeline stages that hold a copy of the tied word embedding (the first
            and last stage always do; stages with tied early-exit heads must be added so that
            megatron-core's embedding group keeps every copy in sync).
        timeout_s: how long a collective may wait, in the process group and in every parallel
            group (``--distributed-timeout-minutes``; Megatron-LM's default, 10 minutes).
    """
    from megatron.core import parallel_state

    install_cpu_compat()
    _init_process_group(timeout_s)
    stages = set(embedding_stages or ())
    pp_size = pipeline_model_parallel_size

    def embedding_ranks(pp_ranks, *_):
        if len(pp_ranks) == 1:
            return [pp_ranks[0]]
        chosen = {0, len(pp_ranks) - 1} | {s for s in stages if 0 <= s < len(pp_ranks)}
        return [pp_ranks[s] for s in sorted(chosen)]

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pp_size,
        get_embedding_ranks=embedding_ranks,
        distributed_timeout_minutes=timeout_s / 60.0,
    )
    _seed_everything(seed + 100 * parallel_state.get_pipeline_model_parallel_rank())
    return current_layout()


def _seed_everything(seed: int) -> None:
    """Seed Python, NumPy, torch and megatron's RNG tracker (as Megatron-LM does: offset by the
    pipeline rank so stages differ; equal across data- and tensor-parallel ranks)."""
    import random

    import numpy as np
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def current_layout() -> ParallelLayout:
    """The layout of the initialised parallel state."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    return ParallelLayout(
        world_size=dist.get_world_size(),
        rank=dist.get_rank(),
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        data_parallel_size=ps.get_data_parallel_world_size(),
        tensor_model_parallel_rank=ps.get_tensor_model_parallel_rank(),
        pipeline_model_parallel_rank=ps.get_pipeline_model_parallel_rank(),
        data_parallel_rank=ps.get_data_parallel_rank(),
    )


def destroy() -> None:
    """Tear down parallel groups and the process group (avoids aborts at interpreter exit)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
