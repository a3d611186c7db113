"""Multi-rank serving: rank 0 serves HTTP and broadcasts commands; the other ranks loop on them.

Under ``torchrun`` over TP x PP ranks every rank must join every generation's collectives. Rank 0
(group rank 0 of ``group``) wraps its local generator in ``BroadcastingGenerator``: each call first
broadcasts a ``Command`` (which method, with which ``GenerationRequest``) with
``torch.distributed.broadcast_object_list``, then runs the local generator. Every other rank runs
``worker_loop(generator, group)``, which receives the commands and makes the same calls until
``STOP``. The service layer serialises requests, so broadcasts are never interleaved.

``run_ranks`` puts both sides together: it serves a ``GenerationService`` on rank 0 (closing it,
then broadcasting ``STOP``, when serving ends, however it ends) and loops on the others::

    run_ranks(generator, lambda service: serve(create_app(service), host, port))

Random seeds are chosen on rank 0 (by the service) before the broadcast, so all ranks sample alike.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal, TypeVar

import torch.distributed as dist

from megatron.early_exit.server.generator import (
    PromptCompletion,
    PromptScores,
    StreamItem,
    TextGenerator,
)
from megatron.early_exit.server.protocol import GenerationRequest, ServerLimits
from megatron.early_exit.server.service import GenerationService

logger = logging.getLogger(__name__)

CommandKind = Literal["generate", "stream", "score", "stop"]
GENERATE: CommandKind = "generate"
STREAM: CommandKind = "stream"
SCORE: CommandKind = "score"
STOP: CommandKind = "stop"
T = TypeVar("T")


@dataclass(frozen=True)
class Command:
    """What rank 0 asks every other rank to do next."""

    kind: CommandKind
    params: GenerationRequest | None = None

    def __post_init__(self) -> None:
        if self.kind not in (GENERATE, STREAM, SCORE, STOP):
            raise ValueError(f"unknown command kind {self.kind!r}")
        if (self.kind == STOP) != (self.params is None):
            raise ValueError("a stop command takes no params; generate and stream need params")


def broadcast_command(command: Command | None, group=None, src: int = 0) -> Command:
    """Send ``command`` from group rank ``src`` (others pass None); every rank returns it."""
    box = [command]
    dist.broadcast_object_list(box, group=group, group_src=src)
    received = box[0]
    assert isinstance(received, Command), f"received {type(received).__name__}, not a Command"
    return received


class BroadcastingGenerator:
    """Rank 0's generator: broadcasts each call to the other ranks, then runs it locally.

    Not thread-safe by itself: ``GenerationService`` calls it from its one generation thread, and
    ``stop`` must come after the last call has returned (``run_ranks`` closes the service first).
    """

    def __init__(self, generator: TextGenerator, group=None, src: int = 0) -> None:
        self.local = generator
        self.group = group
        self.src = src
        self.stopped = False

    @property
    def tokenizer(self):
        return self.local.tokenizer

    @property
    def num_layers(self) -> int:
        return self.local.num_layers

    @property
    def exit_depths(self) -> tuple[int, ...]:
        return self.local.exit_depths

    @property
    def max_sequence_length(self) -> int | None:
        return self.local.max_sequence_length

    @property
    def decoding_methods(self) -> tuple[str, ...]:
        return self.local.decoding_methods

    # Optional capabilities, forwarded so the service refuses what the model cannot do with a
    # 400 (not a 500 from the engine, after the broadcast).
    @property
    def confidence_measures(self) -> tuple[str, ...] | None:
        return getattr(self.local, "confidence_measures", None)

    @property
    def can_score(self) -> bool:
        return getattr(self.local, "can_score", False)

    @property
    def reports_exit_max_probs(self) -> bool:
        return getattr(self.local, "reports_exit_max_probs", False)

    @property
    def chat_template(self) -> str | None:
        return getattr(self.local, "chat_template", None)

    def _send(self, command: Command) -> None:
        if self.stopped:
            raise RuntimeError("the worker ranks were already stopped")
        broadcast_command(command, self.group, self.src)

    def generate(self, params: GenerationRequest) -> list[PromptCompletion]:
        self._send(Command(GENERATE, params))
        return self.local.generate(params)

    def stream(self, params: GenerationRequest) -> Iterator[StreamItem]:
        # Broadcast eagerly (not at the first next()) so the workers start with rank 0.
        self._send(Command(STREAM, params))
        return iter(self.local.stream(params))

    def score(self, params: GenerationRequest) -> list[PromptScores]:
        self._send(Command(SCORE, params))
        return self.local.score(params)

    def stop(self) -> None:
        """Tell the other ranks to leave ``worker_loop`` (idempotent)."""
        if not self.stopped:
            broadcast_command(Command(STOP), self.group, self.src)
            self.stopped = True


def worker_loop(generator: TextGenerator, group=None, src: int = 0) -> int:
    """Receive commands from group rank ``src`` and run them on ``generator`` until ``STOP``.

    A failing generation is logged and the loop goes on (rank 0 reports the error to its client).
    Returns the number of generation commands run.
    """
    num_commands = 0
    while True:
        command = broadcast_command(None, group, src)
        if command.kind == STOP:
            return num_commands
        num_commands += 1
        try:
            if command.kind == GENERATE:
                generator.generate(command.params)
            elif command.kind == SCORE:
                generator.score(command.params)
            else:
                for _ in generator.stream(command.params):
                    pass
        except Exception:
            logger.exception("worker rank: %s command failed", command.kind)


def run_ranks(
    generator: TextGenerator,
    serve_fn: Callable[[GenerationService], T],
    group=None,
    *,
    limits: ServerLimits | None = None,
    model_name: str = "ee-llm",
    chat_template: str | None = None,
) -> T | int:
    """Serve on group rank 0, looping on ``worker_loop`` on the other ranks.

    Rank 0 builds a ``GenerationService`` over a ``BroadcastingGenerator`` (over the generator
    itself when the group has one rank: then a concurrent generator serves concurrently) and calls
    ``serve_fn(service)`` (e.g. ``lambda s: serve(create_app(s), host, port)``). However that ends,
    the service is closed first (queued and running requests finish) and ``STOP`` is broadcast
    after, so it never interleaves with a generation. Returns ``serve_fn``'s value on rank 0 and
    the number of commands run on the others.
    """
    if dist.get_rank(group) != 0:
        return worker_loop(generator, group)
    # With one rank there is nobody to broadcast to: the service gets the generator as it is.
    alone = dist.get_world_size(group) == 1
    served = generator if alone else BroadcastingGenerator(generator, group)
    service = GenerationService(served, limits, model_name, chat_template)
    try:
        return serve_fn(service)
    finally:
        service.close()
        if not alone:
            served.stop()
