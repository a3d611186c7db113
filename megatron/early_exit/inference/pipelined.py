"""Pipelined early-exit decoding (PP > 1): EE-LLM's method B, with its gaps closed.

Every token runs through every layer, so every stage's KV cache is always complete and nothing
is ever recomputed. The gain is latency: the first stage starts token ``t + 1`` as soon as some
exit has produced token ``t``, while the deeper stages are still finishing token ``t``'s K/V.

Protocol (one pipeline; every rank of the pipeline group runs :func:`stream_pipelined` with the
same arguments; TP ranks of a stage compute alike, since logits are gathered over TP):

* stage ``s`` sends stage ``s + 1``, per step, a header ``[STEP, n, t, decided[b], active[b]]``
  and the chunk's hidden states ``[n, b, h]`` (a prompt of width ``n`` at the first step, then
  one token). ``active``: rows still generating (stage 0 applies EOS, stop strings and the
  length limit); ``decided``: rows whose token ``t`` an earlier exit has already produced.
* a stage runs all its layers for every row (KV complete) and evaluates its allowed exits only
  while some active row is undecided; a block exit's own layer always runs (its KV slot stays
  complete). The last stage runs the final head only for rows nobody decided (the original
  always computed it).
* *reporting* stages are the later stages (``s > 0``) hosting an allowed exit, and the last
  stage. A reporting stage that receives a step with undecided rows sends stage 0
  ``[b, 3]`` = (token or -1, exit depth, log-prob) for the rows it decided. Stage 0 knows which
  stages will report (it reads the decided mask after each report, in stage order) and waits
  for exactly those; the last stage decides every row still open, so stage 0 always learns
  token ``t``.
* when no row is active, stage 0 sends a ``DONE`` header down the pipeline and every stage
  leaves its loop; the results are broadcast from stage 0 to the whole pipeline group.

Sends are non-blocking and receives blocking (``pipeline/comm.py``); peers are addressed by
their rank *in the pipeline group* (the original used global ranks 0..P-1, wrong with TP > 1 or
several pipelines). Messages between two stages arrive in order, which the protocol relies on.

Sampling: the row generators are reseeded per token index (``RowSampler.sample(step=t)``), so
whichever stage samples token ``t`` draws as the first stage would, and pipelined decoding
samples the same tokens as KV recomputation given the same decisions.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron.early_exit.inference.decide import ExitPolicy
from megatron.early_exit.inference.engine import Engine, ExitView
from megatron.early_exit.inference.kv_cache import KVCache
from megatron.early_exit.inference.policies import DecodeState, Emitted, decide_rows
from megatron.early_exit.pipeline.comm import StageCommunicator
from megatron.early_exit.placement import exit_heads_on_stage

STEP, DONE = 1, 0
_MAX_PENDING_SENDS = 16


def reporting_stages(config, exit_depths: Sequence[int]) -> list[int]:
    """Later stages (``s > 0``) that may decide a token: those with an allowed exit, and the
    last stage (whose final head decides what nobody else did)."""
    num_stages = config.pipeline_model_parallel_size
    allowed = set(exit_depths)
    stages = [
        s
        for s in range(1, num_stages - 1)
        if any(e.depth in allowed for e in exit_heads_on_stage(config, s))
    ]
    return [*stages, num_stages - 1]


class _Step:
    """One stage's view of token ``t``: who is active, who is decided, what was decided here."""

    def __init__(self, index: int, active: torch.Tensor, decided: torch.Tensor, num_layers: int):
        self.index = index
        self.active = active
        self.decided = decided.clone()
        batch_size = active.shape[0]
        self.tokens = torch.full((batch_size,), -1, dtype=torch.long)
        self.depths = torch.full((batch_size,), num_layers, dtype=torch.long)
        self.logprobs = torch.zeros(batch_size)

    @property
    def undecided(self) -> torch.Tensor:
        return self.active & ~self.decided

    def take(self, rows: torch.Tensor, tokens, logprobs, depth: int) -> None:
        self.tokens[rows], self.logprobs[rows], self.depths[rows] = (
            tokens[rows],
            logprobs[rows],
            depth,
        )
        self.decided |= rows

    def decision_message(self, decided_here: torch.Tensor) -> torch.Tensor:
        """``[b, 3]`` float64 (token or -1, depth, log-prob) of the rows decided on this stage."""
        tokens = torch.where(decided_here, self.tokens, torch.full_like(self.tokens, -1))
        return torch.stack([tokens.double(), self.depths.double(), self.logprobs.double()], dim=1)

    def merge(self, message: torch.Tensor) -> None:
        rows = message[:, 0] >= 0
        self.tokens[rows] = message[rows, 0].long()
        self.depths[rows] = message[rows, 1].long()
        self.logprobs[rows] = message[rows, 2].float()
        self.decided |= rows


class _StageRunner:
    """Runs one stage's share of each step and its messages."""

    def __init__(self, engine: Engine, cache: KVCache, state: DecodeState, exit_depths, policy):
        config = engine.model.config
        self.engine, self.cache, self.state, self.policy = engine, cache, state, policy
        self.stage = parallel_state.get_pipeline_model_parallel_rank()
        self.num_stages = config.pipeline_model_parallel_size
        self.group = parallel_state.get_pipeline_model_parallel_group()
        device = next(engine.model.parameters()).device
        self.comm = StageCommunicator(self.group, self.stage, self.num_stages, device)
        self.device = device
        self.batch_size = state.active.shape[0]
        self.hidden_shape = (self.batch_size, config.hidden_size)
        self.hidden_dtype = config.params_dtype
        self.local_exits = tuple(d for d in exit_depths if d in engine.exits)
        self.reporting = reporting_stages(config, exit_depths)

    # ------------------------------------------------------------------ one stage's step

    def run_stage(self, step: _Step, tokens=None, hidden=None) -> torch.Tensor | None:
        """Run the stage's layers and exits for ``step``; returns the output hidden states."""
        sampler, num_layers = self.state.sampler, self.engine.num_layers

        def on_exit(depth: int, view: ExitView) -> bool:
            fired = decide_rows(view, self.policy, step.undecided)
            if fired.any():
                draw = sampler.sample(view.logits()[:, -1], fired, step.index)
                step.take(fired, draw.tokens, draw.logprobs, depth)
            return False  # never stop: the deeper layers of this stage still need the KV

        out = self.engine.forward(
            self.cache,
            tokens,
            self.local_exits,
            on_exit,
            hidden=hidden,
            final_logits=bool(step.undecided.any()),
        )
        if out.final_logits is not None:
            rows = step.undecided
            draw = sampler.sample(out.final_logits[:, -1], rows, step.index)
            step.take(rows, draw.tokens, draw.logprobs, num_layers)
        return out.hidden

    def send_next(self, step: _Step, hidden: torch.Tensor) -> None:
        header = torch.cat(
            [
                torch.tensor([STEP, hidden.shape[0], step.index]),
                step.decided.long(),
                step.active.long(),
            ]
        )
        self.comm.send_next(header.to(self.device))
        self.comm.send_next(hidden)
        self.comm.wait_oldest(_MAX_PENDING_SENDS)

    def send_done(self) -> None:
        if self.stage < self.num_stages - 1:
            header = torch.zeros(3 + 2 * self.batch_size, dtype=torch.long)
            header[0] = DONE
            self.comm.send_next(header.to(self.device))

    # ------------------------------------------------------------------ stage loops

    def run_first(self, recorder) -> Iterator[None]:
        """Stage 0: embeds, runs its exits, collects each token's decision, applies stops;
        yields after each recorded step (so the caller can stream it)."""
        state = self.state
        while state.active.any():
            step = _Step(
                state.num_generated, state.active.clone(), ~state.active, self.engine.num_layers
            )
            hidden = self.run_stage(step, tokens=state.inputs)
            self.send_next(step, hidden)
            for stage in self.reporting:
                if not step.undecided.any():
                    break
                message = self.comm.recv_from((self.batch_size, 3), torch.float64, stage)
                step.merge(message.cpu())
            assert not step.undecided.any(), "the last stage decides every open row"
            tokens = torch.where(step.active, step.tokens, torch.zeros_like(step.tokens))
            emitted = Emitted(
                tokens.unsqueeze(1), step.logprobs.unsqueeze(1), step.depths.unsqueeze(1)
            )
            state.active = recorder.add(emitted, state.active)
            state.inputs = tokens.unsqueeze(1).to(self.device)
            state.num_generated += 1
            yield
        self.send_done()
        self.comm.wait_all()

    def run_later(self) -> None:
        """Stages ``s > 0``: receive, run, pass on, report decisions to stage 0."""
        header_size = 3 + 2 * self.batch_size
        reports = self.stage in self.reporting
        while True:
            header = self.comm.recv_prev((header_size,), torch.long).cpu()
            if int(header[0]) == DONE:
                self.send_done()
                break
            width, index = int(header[1]), int(header[2])
            decided = header[3 : 3 + self.batch_size].bool()
            active = header[3 + self.batch_size :].bool()
            hidden = self.comm.recv_prev((width, *self.hidden_shape), self.hidden_dtype)
            step = _Step(index, active, decided, self.engine.num_layers)
            open_on_arrival = step.undecided.clone()
            hidden = self.run_stage(step, hidden=hidden)
            if self.stage < self.num_stages - 1:
                self.send_next(step, hidden)
            if reports and open_on_arrival.any():
                message = step.decision_message(step.decided & open_on_arrival)
                self.comm.send_to(message.to(self.device), 0)
                self.comm.wait_oldest(_MAX_PENDING_SENDS)
        self.comm.wait_all()


def stream_pipelined(
    engine: Engine,
    cache: KVCache,
    state: DecodeState,
    recorder,
    exit_depths: Sequence[int],
    policy: ExitPolicy,
) -> Iterator[list | None]:
    """Decode ``state`` over the pipeline: stage 0 yields None after each recorded step; then
    every rank of the pipeline group yields the results (``recorder.results()`` of stage 0,
    broadcast) as the last item."""
    runner = _StageRunner(engine, cache, state, exit_depths, policy)
    if runner.stage == 0:
        yield from runner.run_first(recorder)
        results = [recorder.results()]
    else:
        runner.run_later()
        results = [None]
    dist.broadcast_object_list(results, group=runner.group, group_src=0)
    yield results[0]
