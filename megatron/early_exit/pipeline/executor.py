"""Runs one stage's plan (``pipeline/plan.py``): forwards, deferred exit losses and backwards.

Gradient identity. For one iteration with ``M`` microbatches the objective is

    J = (1/M) * sum_j [ include_final * L_final_j + sum_i w_i * L_{i,j} ]

On stage ``s`` with input ``x`` (received activation), output ``y`` and local exit losses
``L_{i,j}``, the received gradient is ``g = dJ/dy``. A single backward call

    torch.autograd.backward([y, exit_term], [g, 1]),   exit_term = scale/M * sum_i w_i L_{i,j}

accumulates ``(dy/dtheta)^T g + d(exit_term)/dtheta`` into the stage's parameters and
``(dy/dx)^T g + d(exit_term)/dx = dJ/dx`` into ``x.grad``, which is exactly the gradient of J
(``y`` depends on ``theta`` and ``x`` only through this stage, and the exit losses of later stages
reach ``x`` only through ``y``). It is the original EE-LLM's surrogate ``<y, g> + exit_term``
without building the inner product. No losses cross stages; the communication is the same tensor
per microbatch as plain 1F1B. ``scale`` is the fp16 loss scale, applied to exit terms exactly as to
the final loss (the original forgot it); ``g`` already carries it.

Deferred exits (default): the forward records each exit's input and the exit head runs right
before that microbatch's backward, so exit logits of one microbatch at a time are alive and the
exit work fills the time a middle stage would wait for the next stage's gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from megatron.early_exit.model.builder import unwrap_model
from megatron.early_exit.model.losses import masked_mean
from megatron.early_exit.pipeline.comm import StageCommunicator
from megatron.early_exit.pipeline.plan import BACKWARD_OF, FORWARD_OF, Action, ActionKind


@dataclass(frozen=True)
class ExecutionOptions:
    """How losses are weighted and when exits run."""

    exit_weights: dict[int, float]
    include_final_loss: bool = True
    loss_scale: float = 1.0
    defer_exits: bool = True
    num_microbatches: int = 1  # M, the normaliser of every loss term (fills included)


@dataclass
class StageLosses:
    """Sums of masked-mean losses this stage computed, and how many microbatches each has."""

    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, value: torch.Tensor) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + float(value.detach())
        self.counts[name] = self.counts.get(name, 0) + 1

    def means(self) -> dict[str, float]:
        return {name: total / self.counts[name] for name, total in self.sums.items()}


@dataclass
class _Stored:
    input_tensor: torch.Tensor | None
    output: torch.Tensor
    exits: dict  # depth -> PendingExit (deferred) or per-token loss tensor
    batch: dict


class StageExecutor:
    """Executes one stage's actions; handed its model, communicator and activation shape."""

    def __init__(
        self,
        model,
        communicator: StageCommunicator | None,
        activation_shape: tuple[int, ...],
        activation_dtype: torch.dtype,
        options: ExecutionOptions,
    ):
        self.model = model
        self.module = unwrap_model(model)
        self.comm = communicator
        self.activation_shape = activation_shape
        self.activation_dtype = activation_dtype
        self.options = options
        self._store: dict[tuple[ActionKind, int], _Stored] = {}

    def run(
        self, plan: list[Action], microbatches: list[dict], fill_microbatches: list[dict] = ()
    ) -> StageLosses:
        """Run every action of ``plan``; returns the losses this stage computed."""
        losses = StageLosses()
        truncated = _forwards_without_backward(plan)
        for action in plan:
            batches = fill_microbatches if action.kind in _FILL_KINDS else microbatches
            handler = _HANDLERS[action.kind]
            handler(self, action, batches[action.microbatch], losses)
        if self.comm is not None:
            self.comm.wait_all()
        # Cool-down filling truncates some backwards: those forwards' activations are dropped.
        assert set(self._store) == truncated, (sorted(self._store), sorted(truncated))
        self._store.clear()
        return losses

    # ---------------------------------------------------------------------------- forwards

    def _forward(self, action: Action, batch: dict, losses: StageLosses) -> None:
        input_tensor = self._receive_input(action, requires_grad=True)
        output, exits = self._model_forward(batch, defer=self.options.defer_exits)
        if action.send_output_to_next:
            self.comm.send_next(output)
        self._store[(action.kind, action.microbatch)] = _Stored(input_tensor, output, exits, batch)

    def _eval_forward(self, action: Action, batch: dict, losses: StageLosses) -> None:
        with torch.no_grad():
            self._receive_input(action, requires_grad=False)
            output, exits = self._model_forward(batch, defer=True)
            if action.send_output_to_next:
                self.comm.send_next(output)
            for depth, pending in exits.items():
                per_token = pending.compute() if hasattr(pending, "compute") else pending
                losses.add(f"exit_{depth}", masked_mean(per_token, batch["loss_mask"]))
                _add_components(losses, depth, pending, batch["loss_mask"])
            if self.module.post_process:
                losses.add("final", masked_mean(output, batch["loss_mask"]))

    def _tune_forward(self, action: Action, batch: dict, losses: StageLosses) -> None:
        # Frozen backbone: no graph through it; exits record detached hidden states.
        with torch.no_grad():
            self._receive_input(action, requires_grad=False)
            # Nothing after this stage's deepest exit has a loss unless a later stage needs it.
            stop = not action.send_output_to_next
            output, pending = self._model_forward(batch, defer=True, stop_after_exits=stop)
            if action.send_output_to_next:
                self.comm.send_next(output)
        self._store[(action.kind, action.microbatch)] = _Stored(None, output, pending, batch)

    # --------------------------------------------------------------------------- backwards

    def _backward(self, action: Action, batch: dict, losses: StageLosses) -> None:
        stored = self._store.pop((FORWARD_OF[action.kind], action.microbatch))
        terms = self._exit_terms(stored, losses)
        if action.kind is ActionKind.BACKWARD and self.module.post_process:
            final = masked_mean(stored.output, batch["loss_mask"])
            losses.add("final", final)
            if self.options.include_final_loss:
                terms.append(self._scale(final))
        tensors, grads = [], []
        if action.recv_grad_from_next:
            tensors.append(stored.output)
            grads.append(self.comm.recv_next(self.activation_shape, self.activation_dtype))
        scalar = torch.stack(terms).sum() if terms else None
        if scalar is not None and scalar.requires_grad:
            tensors.append(scalar)
            grads.append(torch.ones_like(scalar))
        if tensors:
            torch.autograd.backward(tensors, grads)
        if action.send_grad_to_prev:
            self.comm.send_prev(stored.input_tensor.grad)

    def _exit_terms(self, stored: _Stored, losses: StageLosses) -> list[torch.Tensor]:
        """scale/M * w_i * L_i for this stage's exits (computing deferred exits now)."""
        terms = []
        for depth, value in stored.exits.items():
            per_token = value.compute() if hasattr(value, "compute") else value
            loss = masked_mean(per_token, stored.batch["loss_mask"])
            losses.add(f"exit_{depth}", loss)
            _add_components(losses, depth, value, stored.batch["loss_mask"])
            terms.append(self._scale(self.options.exit_weights[depth] * loss))
        return terms

    def _scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * (self.options.loss_scale / self.options.num_microbatches)

    # ------------------------------------------------------------------------------ helpers

    def _receive_input(self, action: Action, requires_grad: bool) -> torch.Tensor | None:
        if not action.recv_input_from_prev:
            return None
        tensor = self.comm.recv_prev(self.activation_shape, self.activation_dtype)
        tensor.requires_grad_(requires_grad)
        self.module.set_input_tensor(tensor)
        return tensor

    def _model_forward(self, batch: dict, defer: bool, stop_after_exits: bool = False):
        return self.model(
            batch["input_ids"],
            batch["position_ids"],
            batch["attention_mask"],
            labels=batch["labels"],
            defer_exits=defer,
            stop_after_exits=stop_after_exits,
        )


def _add_components(losses: StageLosses, depth: int, pending, loss_mask: torch.Tensor) -> None:
    """Report an exit's auxiliary terms (``kl``, ``confidence``; detached, per token) as
    ``<name>_<depth>``; they are already part of the exit's loss gradient."""
    for name, term in getattr(pending, "components", {}).items():
        losses.add(f"{name}_{depth}", masked_mean(term, loss_mask))


def _forwards_without_backward(plan: list[Action]) -> set:
    forwards = {(a.kind, a.microbatch) for a in plan if a.kind in BACKWARD_OF}
    backwards = {(FORWARD_OF[a.kind], a.microbatch) for a in plan if a.kind in FORWARD_OF}
    return forwards - backwards


_FILL_KINDS = frozenset({ActionKind.FILL_FORWARD, ActionKind.FILL_BACKWARD})
_HANDLERS = {
    ActionKind.FORWARD: StageExecutor._forward,
    ActionKind.FILL_FORWARD: StageExecutor._forward,
    ActionKind.EVAL_FORWARD: StageExecutor._eval_forward,
    ActionKind.TUNE_FORWARD: StageExecutor._tune_forward,
    ActionKind.BACKWARD: StageExecutor._backward,
    ActionKind.FILL_BACKWARD: StageExecutor._backward,
    ActionKind.TUNE_BACKWARD: StageExecutor._backward,
}
