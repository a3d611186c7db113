"""GPU tier, issue 15: what a GPU host changes (skipped without a CUDA device).

One spawned process on one GPU, with Transformer Engine's layer spec where TE is installed:

* bf16 training steps through ``train_step`` with the collective-device harness on
  (``tests/device_check.py``); the losses are finite and fall;
* full recomputation (``block``) with exits gives the gradients of the run without it;
* an HF Llama imported on this host (the tools build with the local spec, defect 6) loads into
  the training model (TE's spec here) and gives HF's logits;
* greedy generation from that checkpoint, full decoding, equals HF's greedy tokens.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed.harness import run_distributed

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _bf16_training() -> dict:
    from megatron.early_exit import platform
    from megatron.early_exit.model.builder import build_early_exit_model
    from megatron.early_exit.training.loop import TrainingConfig, setup_trainer, train_step
    from tests.device_check import check_collective_devices
    from tests.helpers import SEQ, VOCAB, make_batch, tiny_config

    config = tiny_config(bf16=True, params_dtype=torch.bfloat16)
    model = build_early_exit_model(config, VOCAB, SEQ, seed=3)
    trainer = setup_trainer(model, TrainingConfig(train_iters=8, lr=3e-3, min_lr=3e-3))
    batches = [{k: v.to(platform.device()) for k, v in make_batch(0).items()}] * 2
    losses = []
    with check_collective_devices():
        for _ in range(8):
            losses.append(train_step(trainer, batches).lm_loss)
    return {"losses": losses}


def _recompute_gradients() -> dict:
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    from megatron.early_exit import platform
    from megatron.early_exit.model.builder import build_early_exit_model
    from megatron.early_exit.pipeline.executor import ExecutionOptions
    from megatron.early_exit.pipeline.schedule import run_pipeline
    from tests.helpers import SEQ, VOCAB, make_batch, relative_error, tiny_config

    batches = [{k: v.to(platform.device()) for k, v in make_batch(i).items()} for i in range(2)]
    grads = []
    for overrides in ({}, dict(recompute_granularity="full", recompute_method="block",
                               recompute_num_layers=4)):  # fmt: skip
        platform.initialize(1, 1, seed=5)
        config = tiny_config(hidden_dropout=0.1, attention_dropout=0.1, **overrides)
        model = build_early_exit_model(config, VOCAB, SEQ, seed=5)
        ddp = DistributedDataParallel(config, DistributedDataParallelConfig(), model)
        options = ExecutionOptions({e.depth: e.loss_weight for e in config.exit_heads},
                                   num_microbatches=2)  # fmt: skip
        ddp.zero_grad_buffer()
        run_pipeline(ddp, config, batches, options)
        finalize_model_grads([ddp])
        grads.append({n: p.main_grad.float().clone() for n, p in model.named_parameters()})
    return {"max_error": max(relative_error(g, grads[0][n]) for n, g in grads[1].items())}


def _hf_import_and_generation(root: str) -> dict:
    from pathlib import Path

    from megatron.early_exit import platform
    from megatron.early_exit.checkpoint.convert import hf_to_megatron
    from megatron.early_exit.checkpoint.loading import build_model
    from megatron.early_exit.checkpoint.record import checkpoint_config
    from megatron.early_exit.checkpoint.store import load_checkpoint, read_checkpoint_info
    from megatron.early_exit.inference.generate import GenerationParams, generate
    from megatron.early_exit.model.layer_specs import uses_transformer_engine
    from tests.helpers import tiny_hf_model

    hf = tiny_hf_model("llama", 2)
    hf.save_pretrained(str(Path(root) / "hf"))
    hf_to_megatron(Path(root) / "hf", Path(root) / "ckpt")
    info = read_checkpoint_info(Path(root) / "ckpt")
    config = checkpoint_config(info)  # megatron-core's default implementation: TE where present
    model = build_model(config, info.model)
    load_checkpoint(Path(root) / "ckpt", model)
    model.eval()
    tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    hf = hf.to(platform.device())
    with torch.no_grad():
        expected = hf(input_ids=tokens.to(platform.device())).logits.float()
        positions = torch.arange(12).unsqueeze(0).expand(2, -1).to(platform.device())
        mask = torch.ones(1, 1, 12, 12, dtype=torch.bool, device=platform.device()).triu(1)
        ours, _ = model(tokens.to(platform.device()), positions, mask, runtime_gather_output=True)
        hf_greedy = hf.generate(tokens[:1, :6].to(platform.device()), max_new_tokens=8,
                                do_sample=False)[0, 6:].tolist()  # fmt: skip
    params = GenerationParams(max_new_tokens=8, early_exit=False)
    ours_greedy = generate(model, [tokens[0, :6].tolist()], params)[0].tokens
    return {
        "te": uses_transformer_engine(config),
        "logits_max_abs": (ours.float() - expected).abs().max().item(),
        # HF stops after an EOS it emits; full decoding here runs on for 8 tokens
        "greedy_equal": bool(hf_greedy) and list(ours_greedy)[: len(hf_greedy)] == hf_greedy,
    }


def gpu_cluster_worker(rank: int, world_size: int, root: str) -> dict:
    from megatron.early_exit import platform

    platform.initialize(1, 1, seed=3)
    return {
        "bf16": _bf16_training(),
        "recompute": _recompute_gradients(),
        "hf": _hf_import_and_generation(root),
    }


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    pytest.importorskip("transformers")
    return run_distributed(gpu_cluster_worker, 1, str(tmp_path_factory.mktemp("gpu")))[0]


def test_bf16_training_steps_on_the_gpu(results):
    losses = results["bf16"]["losses"]
    assert all(x == x and 0 < x < 100 for x in losses), losses
    assert losses[-1] < losses[0], losses


def test_full_recomputation_with_exits_on_the_gpu(results):
    assert results["recompute"]["max_error"] < 1e-5, results["recompute"]


def test_hf_import_loads_into_the_training_spec_and_generates(results):
    hf = results["hf"]
    assert hf["logits_max_abs"] < 1e-3, hf
    assert hf["greedy_equal"], hf
