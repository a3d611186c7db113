"""GPU tier: runs only where CUDA exists (skipped on CPU machines and in CPU CI).

The same tiny early-exit model on the GPU (Transformer Engine spec when TE is installed, local
spec otherwise) must give the losses the CPU computes from the same weights.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed.harness import run_distributed

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def gpu_worker(rank: int, world_size: int) -> dict:
    from megatron.early_exit import platform
    from megatron.early_exit.model.builder import build_early_exit_model
    from tests.helpers import SEQ, VOCAB, make_batch, tiny_config

    platform.initialize(1, 1, seed=1)
    model = build_early_exit_model(
        tiny_config("gpt", use_cpu_initialization=True), VOCAB, SEQ, seed=3
    )
    batch = make_batch(0)
    losses = {}
    # TE layers cannot run on the CPU: with TE, only the GPU run is checked (finite, right shape).
    devices = (
        [platform.device()] if platform.has_transformer_engine() else ["cpu", platform.device()]
    )
    for device in devices:
        model.to(device)
        tensors = {k: v.to(device) for k, v in batch.items()}
        final, exits = model(tensors["input_ids"], tensors["position_ids"],
                             tensors["attention_mask"], labels=tensors["labels"])  # fmt: skip
        losses[str(device)] = [final.mean().item()] + [v.mean().item() for v in exits.values()]
    return {"losses": losses, "te": platform.has_transformer_engine()}


def test_gpu_losses_match_cpu():
    result = run_distributed(gpu_worker, 1)[0]
    if result["te"]:
        (gpu,) = result["losses"].values()
        assert len(gpu) == 5 and all(x == x and 0 < x < 100 for x in gpu)
        return
    cpu, gpu = (result["losses"][k] for k in sorted(result["losses"], key=lambda k: k != "cpu"))
    assert len(cpu) == 5
    for a, b in zip(cpu, gpu):
        assert abs(a - b) / abs(a) < 1e-3, (cpu, gpu)
