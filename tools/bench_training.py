"""Benchmark early-exit pipeline training against megatron-core's own 1F1B schedule.

    python tools/bench_training.py   # both suites: 10 minutes on a shared 2-core machine
    python tools/bench_training.py --only pp2 --iters 30 --json bench.json

Spawns its own ranks (gloo on CPU, NCCL on GPU; one process per pipeline stage) and prints one
table per suite, every number measured in this run:

* ``pp2`` (2 ranks): megatron-core's ``forward_backward_pipelining_without_interleaving`` on a
  plain ``GPTModel`` with our backbone spec (the baseline) against our executor
  (``pipeline/schedule.run_pipeline``) on ``EarlyExitGPTModel`` with no exits, and with one
  untied norm exit at the end of stage 0, deferred exits on and off.
* ``pp4`` (4 ranks): exits at the end of stages 0, 1 and 2; bubble filling off, on with the
  default counts (``FillConfig()``: warm-up and cool-down fills), and warm-up fills only.

Timing: configurations run round-robin (the starting configuration rotates every round) so that
machine noise hits all of them alike; each iteration is fenced by barriers, so its wall time is
the slowest rank's. Reported: the wall median, interquartile range and minimum, their ratios to
the suite's baseline (first row), and the median of per-round paired ratios (each configuration
over the baseline of the same round). Each rank also records its process CPU time per iteration
(gloo waits block without spinning, so this is the stage's own work: compute, exit heads, p2p
copies); its median per stage, and the busiest and total stage CPU over the baseline's, hold up
when other jobs load the machine and wall times do not. An iteration is the schedule call only
(forward, exit and final losses, backward, p2p); gradient finalisation and the optimizer step
are the same for every configuration and are left out.

Memory, per stage, one untimed iteration per configuration after the timed rounds:

* ``saved``: the peak, over the iteration, of the bytes of distinct non-parameter storages that
  autograd holds for backward (``torch.autograd.graph.saved_tensors_hooks``; a storage counts from
  the first time it is saved until the last graph node holding it is freed). This is activation
  memory as 1F1B reasons about it, device-independent and deterministic.
* ``peak``: on CPU the peak resident set size during the iteration minus the resident set size at
  its start (``malloc_trim`` first, the peak reset through ``/proc/self/clear_refs``), which adds
  temporaries, gradient buffers touched for the first time and communication buffers, and is
  blurred by the allocator; on GPU the platform's peak allocated bytes minus the bytes allocated
  at the start.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

SEED = 1234
MIB = 1 << 20


# ------------------------------------------------------------------------------------ settings


@dataclass(frozen=True)
class Settings:
    """Model and measurement sizes shared by every configuration of a suite."""

    iters: int
    warmup: int
    hidden_size: int
    num_layers: int
    seq_length: int
    micro_batch_size: int
    num_microbatches: int
    vocab_size: int
    backward_forward_ratio: float


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=15, help="timed rounds per configuration")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-layers", type=int, default=8)
    parser.add_argument("--seq-length", type=int, default=128)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--num-microbatches", type=int, default=8)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--backward-forward-ratio", type=float, default=2.0)
    parser.add_argument("--only", choices=("pp2", "pp4"), help="run one suite")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per suite")
    args = parser.parse_args(argv)
    if args.iters < 1 or args.warmup < 0:
        parser.error("--iters must be >= 1 and --warmup >= 0")
    if args.num_layers % 4:
        parser.error("--num-layers must be a multiple of 4 (the pp4 suite splits it evenly)")
    if args.hidden_size % 64:
        parser.error("--hidden-size must be a multiple of 64 (heads of size 64)")
    return args


# ------------------------------------------------------------------------ models and batches


def _base_fields(settings: Settings, num_stages: int) -> dict:
    import torch

    from megatron.early_exit import platform

    fields = dict(
        num_layers=settings.num_layers,
        hidden_size=settings.hidden_size,
        ffn_hidden_size=4 * settings.hidden_size,
        num_attention_heads=settings.hidden_size // 64,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.02,
        normalization="LayerNorm",
        add_bias_linear=True,
        pipeline_model_parallel_size=num_stages,
        pipeline_dtype=torch.float32,
    )
    fields.update(platform.config_overrides())
    return fields


def _exit_heads(settings: Settings, stages: tuple[int, ...], num_stages: int) -> tuple:
    """One untied norm exit after the last layer of each stage in ``stages``."""
    from megatron.early_exit.config import ExitHeadConfig

    per_stage = settings.num_layers // num_stages
    return tuple(
        ExitHeadConfig((s + 1) * per_stage, structure="norm", loss_weight=1.0, untied=True)
        for s in stages
    )


def build_megatron_baseline(settings: Settings, num_stages: int):
    """megatron-core's GPTModel (our backbone spec), DDP-wrapped; returns (config, ddp)."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer import TransformerConfig

    from megatron.early_exit import platform
    from megatron.early_exit.model.layer_specs import decoder_block_spec

    config = TransformerConfig(**_base_fields(settings, num_stages))
    model = GPTModel(
        config,
        transformer_layer_spec=decoder_block_spec(config),
        vocab_size=settings.vocab_size,
        max_sequence_length=settings.seq_length,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        position_embedding_type="learned_absolute",
    ).to(platform.device())
    return config, DistributedDataParallel(config, DistributedDataParallelConfig(), model)


def build_early_exit(settings: Settings, num_stages: int, exit_stages: tuple[int, ...]):
    """EarlyExitGPTModel with the same backbone, DDP-wrapped; returns (config, ddp)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron.early_exit.config import EarlyExitTransformerConfig
    from megatron.early_exit.model.builder import build_early_exit_model

    config = EarlyExitTransformerConfig(
        **_base_fields(settings, num_stages),
        exit_heads=_exit_heads(settings, exit_stages, num_stages),
    )
    model = build_early_exit_model(
        config, settings.vocab_size, settings.seq_length, position_embedding_type="learned_absolute"
    )
    return config, DistributedDataParallel(config, DistributedDataParallelConfig(), model)


def make_batches(settings: Settings, count: int, seed: int) -> list[dict]:
    """Random-token microbatches (timing does not depend on the tokens)."""
    import torch

    from megatron.early_exit import platform

    generator = torch.Generator().manual_seed(seed)
    b, s = settings.micro_batch_size, settings.seq_length
    batches = []
    for _ in range(count):
        tokens = torch.randint(0, settings.vocab_size, (b, s + 1), generator=generator)
        batch = {
            "input_ids": tokens[:, :-1].contiguous(),
            "labels": tokens[:, 1:].contiguous(),
            "position_ids": torch.arange(s).unsqueeze(0).expand(b, -1).contiguous(),
            "attention_mask": torch.ones(1, 1, s, s, dtype=torch.bool).triu(1),
            "loss_mask": torch.ones(b, s),
        }
        batches.append({k: v.to(platform.device()) for k, v in batch.items()})
    return batches


# ----------------------------------------------------------------------- one iteration each


@dataclass
class Case:
    """One configuration: a name and a callable that runs one iteration on this rank."""

    name: str
    run: object  # () -> None
    parameters: object  # iterable of the model's parameters (excluded from ``saved``)
    extra_microbatches: int = 0
    skipped_backwards: tuple[int, ...] = ()  # per stage (cool-down fill)


def _megatron_loss(loss_mask, output_tensor):
    from megatron.early_exit.model.losses import masked_mean

    loss = masked_mean(output_tensor, loss_mask)
    return loss, {"lm loss": loss.detach()}


def _megatron_forward_step(data_iterator, model):
    from functools import partial

    batch = next(data_iterator)
    output = model(
        batch["input_ids"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"]
    )
    return output, partial(_megatron_loss, batch["loss_mask"])


def megatron_case(name: str, settings: Settings, ddp, batches: list[dict]) -> Case:
    from megatron.core.pipeline_parallel.schedules import (
        forward_backward_pipelining_without_interleaving,
    )

    def run():
        ddp.zero_grad_buffer()
        forward_backward_pipelining_without_interleaving(
            forward_step_func=_megatron_forward_step,
            data_iterator=iter(batches),
            model=ddp,
            num_microbatches=len(batches),
            seq_length=settings.seq_length,
            micro_batch_size=settings.micro_batch_size,
        )

    return Case(name, run, ddp.parameters)


def early_exit_case(
    name: str, config, ddp, batches: list[dict], *, defer=True, fill=None, fill_batches=()
) -> Case:
    from megatron.early_exit.pipeline.executor import ExecutionOptions
    from megatron.early_exit.pipeline.schedule import run_pipeline

    weights = {e.depth: e.loss_weight for e in config.exit_heads}
    options = ExecutionOptions(weights, defer_exits=defer, num_microbatches=len(batches))

    def run():
        ddp.zero_grad_buffer()
        run_pipeline(ddp, config, batches, options, fill=fill, fill_microbatches=fill_batches)

    return Case(name, run, ddp.parameters, extra_microbatches=len(fill_batches))


def pp2_cases(settings: Settings) -> list[Case]:
    """Baseline first: megatron-core's 1F1B; then our executor without and with a stage-0 exit."""
    batches = make_batches(settings, settings.num_microbatches, SEED)
    _, baseline = build_megatron_baseline(settings, 2)
    plain_config, plain = build_early_exit(settings, 2, exit_stages=())
    exit_config, exits = build_early_exit(settings, 2, exit_stages=(0,))
    return [
        megatron_case("megatron-core 1F1B, GPTModel", settings, baseline, batches),
        early_exit_case("early-exit executor, no exits", plain_config, plain, batches),
        early_exit_case("exit @ end of stage 0, deferred", exit_config, exits, batches),
        early_exit_case(
            "exit @ end of stage 0, not deferred", exit_config, exits, batches, defer=False
        ),
    ]


def pp4_cases(settings: Settings) -> list[Case]:
    """Baseline first: exits on stages 0-2 without fill; then default fill; then warm-up only."""
    from megatron.early_exit.pipeline.bubble_fill import FillConfig, build_fill_schedule
    from megatron.early_exit.placement import stages_with_exits

    batches = make_batches(settings, settings.num_microbatches, SEED)
    config, ddp = build_early_exit(settings, 4, exit_stages=(0, 1, 2))
    cases = [early_exit_case("exits on stages 0-2, no fill", config, ddp, batches)]
    ratio = settings.backward_forward_ratio
    for name, fill in (
        ("fill on (default counts)", FillConfig(backward_forward_ratio=ratio)),
        ("warm-up fill only", FillConfig(None, 0, backward_forward_ratio=ratio)),
    ):
        schedule = build_fill_schedule(
            4, settings.num_microbatches, stages_with_exits(config), fill
        )
        fills = make_batches(settings, schedule.num_effective_warmup, SEED + 1)
        label = (
            f"{name} (F_w={schedule.num_requested_warmup}, "
            f"F_c={schedule.cooldown_skips[0]}, r={ratio:g})"
        )
        case = early_exit_case(label, config, ddp, batches, fill=fill, fill_batches=fills)
        case.skipped_backwards = schedule.cooldown_skips
        cases.append(case)
    return cases


SUITES = {"pp2": (2, pp2_cases), "pp4": (4, pp4_cases)}


# ------------------------------------------------------------------------------ measurement


class SavedActivationTracker:
    """Peak bytes of distinct non-parameter storages saved for backward while active.

    The pack hook wraps each saved tensor in a :class:`_SavedRef`; the ref dies when autograd frees
    the graph node holding it, which is when the storage stops being held for backward.
    """

    def __init__(self, parameters):
        self._excluded = {p.untyped_storage().data_ptr() for p in parameters}
        self._live: dict[int, list[int]] = {}  # storage pointer -> [refs, bytes]
        self.current = 0
        self.peak = 0

    def _pack(self, tensor):
        storage = tensor.untyped_storage()
        key, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes == 0 or key in self._excluded:
            return tensor
        entry = self._live.get(key)
        if entry is None:
            self._live[key] = [1, nbytes]
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        else:
            entry[0] += 1
        return _SavedRef(self, key, tensor)

    def _release(self, key: int) -> None:
        entry = self._live[key]
        entry[0] -= 1
        if entry[0] == 0:
            del self._live[key]
            self.current -= entry[1]

    @contextlib.contextmanager
    def active(self):
        import torch

        unpack = lambda packed: packed.tensor if isinstance(packed, _SavedRef) else packed
        with torch.autograd.graph.saved_tensors_hooks(self._pack, unpack):
            yield self


class _SavedRef:
    __slots__ = ("tracker", "key", "tensor")

    def __init__(self, tracker: SavedActivationTracker, key: int, tensor):
        self.tracker, self.key, self.tensor = tracker, key, tensor

    def __del__(self):
        self.tracker._release(self.key)


@contextlib.contextmanager
def peak_memory_window():
    """Yields a dict whose ``bytes`` is set, on exit, to the peak memory growth in the window
    (GPU: peak allocated - allocated at entry; CPU: peak RSS - RSS at entry; None if unknown)."""
    import torch

    from megatron.early_exit import platform

    result: dict = {"bytes": None}
    if platform.device().type != "cpu":
        platform.synchronize()
        start = torch.accelerator.memory_allocated()
        platform.reset_peak_memory()
        yield result
        platform.synchronize()
        result["bytes"] = platform.peak_memory_bytes() - start
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # return freed heap pages: RSS ~ live memory
    start = _reset_rss_peak()
    yield result
    peak = _proc_status_kib("VmHWM")
    if start is not None and peak is not None:
        result["bytes"] = (peak - start) * 1024


def _reset_rss_peak() -> int | None:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        return None
    return _proc_status_kib("VmRSS")


def _proc_status_kib(name: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _timed(case: Case) -> tuple[float, float]:
    """(wall seconds of the slowest rank, CPU seconds of this rank) for one iteration."""
    import torch.distributed as dist

    from megatron.early_exit import platform

    gc.collect()
    dist.barrier()
    start, cpu_start = time.perf_counter(), time.process_time()
    case.run()
    platform.synchronize()
    cpu = time.process_time() - cpu_start  # gloo blocks without spinning: waits cost no CPU
    dist.barrier()
    return time.perf_counter() - start, cpu


def measure(cases: list[Case], settings: Settings) -> dict:
    """Round-robin timing, then one memory iteration per case; this rank's numbers."""
    wall: dict[str, list[float]] = {c.name: [] for c in cases}
    cpu: dict[str, list[float]] = {c.name: [] for c in cases}
    for round_index in range(settings.warmup + settings.iters):
        shift = round_index % len(cases)
        for case in cases[shift:] + cases[:shift]:
            elapsed, cpu_seconds = _timed(case)
            if round_index >= settings.warmup:
                wall[case.name].append(elapsed)
                cpu[case.name].append(cpu_seconds)
    memory = {}
    for case in cases:
        tracker = SavedActivationTracker(case.parameters())
        gc.collect()
        with peak_memory_window() as window, tracker.active():
            case.run()
        memory[case.name] = {"saved": tracker.peak, "peak": window["bytes"]}
    return {"wall": wall, "cpu": cpu, "memory": memory}


# ------------------------------------------------------------------------------------ ranks


def _suite_worker(
    rank: int, world_size: int, port: int, suite: str, settings: Settings, queue
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS="1",
    )
    try:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        from megatron.early_exit import platform

        platform.initialize(1, world_size, seed=SEED)  # untied exits: no extra embedding stages
        cases = SUITES[suite][1](settings)
        local = measure(cases, settings)
        gathered = [None] * world_size
        torch.distributed.all_gather_object(gathered, (local["cpu"], local["memory"]))
        if rank == 0:
            result = {
                "wall": local["wall"],
                "cpu": [cpu for cpu, _ in gathered],
                "memory": [memory for _, memory in gathered],
                "extra": {c.name: (c.extra_microbatches, c.skipped_backwards) for c in cases},
            }
            queue.put((rank, True, result))
        else:
            queue.put((rank, True, None))
    except BaseException:
        queue.put((rank, False, traceback.format_exc()))
    finally:
        with contextlib.suppress(Exception):
            from megatron.early_exit import platform

            platform.destroy()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_suite(suite: str, settings: Settings, timeout_s: float) -> dict:
    """Spawn the suite's ranks; return rank 0's result (RuntimeError with every traceback)."""
    world_size, port = SUITES[suite][0], _free_port()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [
        ctx.Process(
            target=_suite_worker,
            args=(rank, world_size, port, suite, settings, queue),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    result, failures = None, []
    try:
        for _ in range(world_size):
            rank, ok, payload = queue.get(timeout=timeout_s)
            if not ok:
                failures.append(f"--- rank {rank} ---\n{payload}")
                break
            if rank == 0:
                result = payload
    except Exception as exc:  # queue.Empty: a rank hung
        failures.append(f"timed out after {timeout_s}s ({exc!r})")
    finally:
        for proc in procs:
            proc.join(timeout=10 if not failures else 0.5)
            if proc.is_alive():
                proc.kill()
    if failures:
        raise RuntimeError("\n".join(failures))
    return result


# --------------------------------------------------------------------------------- reporting


@dataclass
class Row:
    """One configuration's result (what ``--json`` writes); ratios are to the suite's first row."""

    suite: str
    config: str
    wall_median_ms: float
    wall_q1_ms: float
    wall_q3_ms: float
    wall_min_ms: float
    wall_ratio: float  # median / baseline median
    wall_paired_ratio: float  # median over rounds of (time / baseline time of the same round)
    wall_paired_ratio_q1: float
    wall_paired_ratio_q3: float
    wall_min_ratio: float  # min / baseline min
    cpu_stage_ms: list[float]  # per stage, median CPU time per iteration
    busiest_cpu_ratio: float  # max over stages of median CPU, over the baseline's
    total_cpu_ratio: float  # sum over stages of median CPU, over the baseline's
    extra_microbatches: int  # warm-up fill microbatches per iteration
    skipped_backwards: list[int]  # per stage, cool-down fill
    saved_mib: list[float] = field(default_factory=list)  # per stage
    peak_mib: list[float | None] = field(default_factory=list)  # per stage
    wall_ms: list[float] = field(default_factory=list)  # every timed round


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def make_rows(suite: str, result: dict) -> list[Row]:
    wall, names = result["wall"], list(result["wall"])
    base = names[0]
    cpu = {n: [statistics.median(stage[n]) for stage in result["cpu"]] for n in names}
    rows = []
    for name in names:
        q1, median, q3 = _quartiles(wall[name])
        paired = [t / b for t, b in zip(wall[name], wall[base], strict=True)]
        p1, p2, p3 = _quartiles(paired)
        per_stage = [stage[name] for stage in result["memory"]]
        rows.append(
            Row(
                suite=suite,
                config=name,
                wall_median_ms=1e3 * median,
                wall_q1_ms=1e3 * q1,
                wall_q3_ms=1e3 * q3,
                wall_min_ms=1e3 * min(wall[name]),
                wall_ratio=median / statistics.median(wall[base]),
                wall_paired_ratio=p2,
                wall_paired_ratio_q1=p1,
                wall_paired_ratio_q3=p3,
                wall_min_ratio=min(wall[name]) / min(wall[base]),
                cpu_stage_ms=[1e3 * c for c in cpu[name]],
                busiest_cpu_ratio=max(cpu[name]) / max(cpu[base]),
                total_cpu_ratio=sum(cpu[name]) / sum(cpu[base]),
                extra_microbatches=result["extra"][name][0],
                skipped_backwards=list(result["extra"][name][1]),
                saved_mib=[m["saved"] / MIB for m in per_stage],
                peak_mib=[None if m["peak"] is None else m["peak"] / MIB for m in per_stage],
                wall_ms=[1e3 * t for t in wall[name]],
            )
        )
    return rows


def format_table(rows: list[Row]) -> str:
    def joined(values, fmt):
        return " / ".join("?" if v is None else format(v, fmt) for v in values)

    header = (
        "| config | wall ms median [IQR] | wall ratio | paired [IQR] | min ratio "
        "| CPU ms / stage | busiest CPU ratio | total CPU ratio | extra mb | skipped bwd "
        "| saved MiB / stage | peak MiB / stage |"
    )
    lines = [header, "|" + "---|" * 12]
    for r in rows:
        lines.append(
            f"| {r.config} | {r.wall_median_ms:.0f} [{r.wall_q1_ms:.0f}-{r.wall_q3_ms:.0f}] "
            f"| {r.wall_ratio:.3f} | {r.wall_paired_ratio:.3f} "
            f"[{r.wall_paired_ratio_q1:.3f}-{r.wall_paired_ratio_q3:.3f}] "
            f"| {r.wall_min_ratio:.3f} | {joined(r.cpu_stage_ms, '.0f')} "
            f"| {r.busiest_cpu_ratio:.3f} | {r.total_cpu_ratio:.3f} "
            f"| {r.extra_microbatches} | {sum(r.skipped_backwards)} "
            f"| {joined(r.saved_mib, '.1f')} | {joined(r.peak_mib, '.0f')} |"
        )
    return "\n".join(lines)


def machine_info() -> dict:
    import torch
    from megatron.core import __version__ as megatron_version

    from megatron.early_exit import platform

    cpu = "unknown"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as handle:
            cpu = next((ln.split(":", 1)[1].strip() for ln in handle if "model name" in ln), cpu)
    return {
        "device": str(platform.device()),
        "backend": platform.distributed_backend(),
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "megatron_core": megatron_version,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    settings = Settings(
        iters=args.iters,
        warmup=args.warmup,
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        seq_length=args.seq_length,
        micro_batch_size=args.micro_batch_size,
        num_microbatches=args.num_microbatches,
        vocab_size=args.vocab_size,
        backward_forward_ratio=args.backward_forward_ratio,
    )
    machine = machine_info()
    print("machine: " + ", ".join(f"{k}={v}" for k, v in machine.items()))
    print("settings: " + ", ".join(f"{k}={v}" for k, v in asdict(settings).items()))
    suites = [args.only] if args.only else list(SUITES)
    rows: list[Row] = []
    for suite in suites:
        start = time.perf_counter()
        suite_rows = make_rows(suite, run_suite(suite, settings, args.timeout))
        rows.extend(suite_rows)
        print(f"\n## {suite} ({SUITES[suite][0]} ranks, {time.perf_counter() - start:.0f} s)")
        print(format_table(suite_rows))
    print(
        "\nratios are to each suite's first row; paired = median of per-round ratios; CPU = "
        "process CPU time per iteration (median over rounds; robust to other load on the machine)"
    )
    if args.json:
        with open(args.json, "w") as handle:
            payload = {
                "machine": machine,
                "settings": asdict(settings),
                "rows": [asdict(r) for r in rows],
            }
            json.dump(payload, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
