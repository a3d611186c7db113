"""Point-to-point communication between adjacent pipeline stages.

Ranks are always *group-relative* (``group_dst``/``group_src`` on the pipeline group), so the
same code runs with TP > 1 and several data-parallel pipelines (the original EE-LLM assumed the
pipeline was global ranks 0..P-1). Sends are non-blocking and receives blocking, which is the
model the lock-step simulator (``pipeline/simulate.py``) verifies plans against; a stage waits for
its outstanding sends at the end of each iteration.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class StageCommunicator:
    """Sends and receives activations/gradients of one stage within its pipeline group."""

    group: object
    stage: int
    num_stages: int
    device: torch.device
    _pending: list = field(default_factory=list)

    def send_next(self, tensor: torch.Tensor) -> None:
        """Send an activation to stage + 1 (non-blocking)."""
        self._isend(tensor, self.stage + 1)

    def send_prev(self, tensor: torch.Tensor) -> None:
        """Send an input gradient to stage - 1 (non-blocking)."""
        self._isend(tensor, self.stage - 1)

    def recv_prev(self, shape, dtype) -> torch.Tensor:
        """Receive an activation from stage - 1 (blocking)."""
        return self._recv(shape, dtype, self.stage - 1)

    def recv_next(self, shape, dtype) -> torch.Tensor:
        """Receive an output gradient from stage + 1 (blocking)."""
        return self._recv(shape, dtype, self.stage + 1)

    def send_to(self, tensor: torch.Tensor, stage: int) -> None:
        """Send to any stage of the pipeline (non-blocking); e.g. an exit's token to stage 0."""
        self._isend(tensor, stage)

    def recv_from(self, shape, dtype, stage: int) -> torch.Tensor:
        """Receive from any stage of the pipeline (blocking)."""
        return self._recv(shape, dtype, stage)

    def wait_oldest(self, keep: int) -> None:
        """Wait for the oldest sends until at most ``keep`` are outstanding (bounds memory)."""
        while len(self._pending) > keep:
            work, _ = self._pending.pop(0)
            work.wait()

    def wait_all(self) -> None:
        """Wait until every send posted so far has completed."""
        for work, _ in self._pending:
            work.wait()
        self._pending.clear()

    def _isend(self, tensor: torch.Tensor, peer: int) -> None:
        assert 0 <= peer < self.num_stages, (self.stage, peer)
        tensor = tensor.detach().contiguous()
        work = dist.isend(tensor, group=self.group, group_dst=peer)
        self._pending.append((work, tensor))  # keep the buffer alive until the send completes

    def _recv(self, shape, dtype, peer: int) -> torch.Tensor:
        assert 0 <= peer < self.num_stages, (self.stage, peer)
        tensor = torch.empty(shape, dtype=dtype, device=self.device)
        dist.recv(tensor, group=self.group, group_src=peer)
        return tensor
