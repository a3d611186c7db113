"""GPU tier: generation on the GPU against the CPU result and the no-cache oracle.

Runs only where CUDA exists (``platform.has_cuda()``). The lean step reads the model's parameters
and runs its own attention (SDPA with explicit masks), so nothing depends on Transformer Engine's
mask handling; TE layers (when installed) are used only by the oracle, megatron's own forward of
one unpadded row with a plain causal mask. Checked on a left-padded batch:

* full decoding: every token is the argmax of the oracle's logits at its position;
* KV recomputation (catch-up of skipped layers) and self-speculation (verify at an offset):
  GPU tokens equal the CPU tokens of the same weights; speculative greedy equals full greedy.
"""

from __future__ import annotations

import pytest
import torch

from megatron.early_exit import platform
from tests.distributed.harness import run_distributed

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not platform.has_cuda(), reason="needs a CUDA device"),
]

FAMILIES = ("gpt", "llama")


def _generate_all(model, prompts) -> dict:
    from megatron.early_exit.inference.decide import ExitPolicy
    from megatron.early_exit.inference.generate import GenerationParams, generate

    runs = {
        "full": GenerationParams(max_new_tokens=10, early_exit=False),
        "recompute": GenerationParams(max_new_tokens=10, exit_policy=ExitPolicy(threshold=0.3)),
        "speculative": GenerationParams(max_new_tokens=10, method="speculative"),
    }
    return {name: generate(model, prompts, params) for name, params in runs.items()}


def _oracle(model, sequence: list[int]) -> torch.Tensor:
    """Final logits ``[1, n, V]`` of megatron's forward of one unpadded row, no cache."""
    device = platform.device()
    n = len(sequence)
    tokens = torch.tensor([sequence], device=device)
    causal = torch.ones(1, 1, n, n, dtype=torch.bool, device=device).triu(1)
    positions = torch.arange(n, device=device).unsqueeze(0)
    with torch.no_grad():
        final, _ = model(tokens, positions, causal, runtime_gather_output=True)
    return final


def gpu_generation_worker(rank: int, world_size: int) -> dict:
    from megatron.early_exit.model.builder import build_early_exit_model
    from tests.helpers import VOCAB, position_embedding_type, tiny_config

    platform.initialize(1, 1, seed=1)
    prompts = [[3, 1, 4, 1, 5, 9, 2], [6, 5], [3, 5, 8, 9]]
    out = {}
    for family in FAMILIES:
        config = tiny_config(family, init_method_std=0.3, use_cpu_initialization=True)
        model = build_early_exit_model(
            config, VOCAB, 64, position_embedding_type=position_embedding_type(family), seed=3
        ).eval()
        gpu = _generate_all(model, prompts)
        worst = 0
        for prompt, result in zip(prompts, gpu["full"]):
            final = _oracle(model, prompt + result.tokens)
            start = len(prompt) - 1
            oracle = final[0, start : start + len(result.tokens)].argmax(-1).tolist()
            worst += sum(a != b for a, b in zip(oracle, result.tokens))
        model.cpu()
        cpu = _generate_all(model, prompts)
        out[family] = {
            "oracle_mismatches": worst,
            "gpu_equals_cpu": {
                k: [r.tokens for r in gpu[k]] == [r.tokens for r in cpu[k]] for k in gpu
            },  # fmt: skip
            "speculative_equals_full": [r.tokens for r in gpu["speculative"]]
            == [r.tokens for r in gpu["full"]],
            "exit_depths": sorted({d for r in gpu["recompute"] for d in r.exit_depths}),
        }
    return out


@pytest.fixture(scope="module")
def results() -> dict:
    return run_distributed(gpu_generation_worker, 1)[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_gpu_generation_matches_cpu_and_no_cache_oracle(results, family):
    result = results[family]
    assert result["oracle_mismatches"] == 0
    assert all(result["gpu_equals_cpu"].values()), result["gpu_equals_cpu"]
    assert result["speculative_equals_full"]
    assert len(result["exit_depths"]) >= 2  # exits fired, so catch-up chunks ran
