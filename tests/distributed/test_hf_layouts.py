"""Converted HF checkpoints load at TP=2 and at PP=2 and give the HF model's logits.

The pytest process builds a random tiny Llama (GQA 4 heads / 2 key-value heads, untied) and a
random tiny GPT-2 (tied, biases, learned positions) from their configs, saves them and computes
their reference logits (fp32). One 2-rank spawn converts each directory with
:func:`convert.hf_to_megatron` (TP=1/PP=1 checkpoint, both ranks as data-parallel replicas), then
loads the checkpoint at TP=2 and at PP=2 (forward chained across the two stages with blocking
p2p) and returns the max absolute logit difference per layout.

HF models are built with the constructor + ``load_state_dict`` (never ``from_pretrained``), and
only in the pytest process: under the CPU compatibility layer ``from_pretrained`` leaves the
rotary ``inv_freq`` buffer uninitialised.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.distributed.harness import run_distributed

LOGIT_TOL = 1e-4
FAMILIES = ("llama", "gpt2")
LAYOUTS = ("tp2", "pp2")
NUM_LAYERS = 4
VOCAB = 128
BATCH, SEQ = 2, 12


def _hf_model(family: str):
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    torch.manual_seed({"llama": 11, "gpt2": 12}[family])
    if family == "llama":
        config = LlamaConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=NUM_LAYERS,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            tie_word_embeddings=False, rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        )  # fmt: skip
    else:
        config = GPT2Config(
            vocab_size=VOCAB, n_embd=64, n_layer=NUM_LAYERS, n_head=4, n_positions=32
        )
    model = AutoModelForCausalLM.from_config(config)
    # Weights far from the init scale: attention not uniform, norms/biases not trivial.
    state = {}
    for name, value in model.state_dict().items():
        if not value.is_floating_point() or name.endswith("inv_freq"):
            state[name] = value
        elif value.dim() == 1:
            state[name] = value + 0.1 * torch.randn_like(value)
        else:
            state[name] = 0.15 * torch.randn_like(value)
    if family == "gpt2":
        state["lm_head.weight"] = state["transformer.wte.weight"]  # tied
    model.load_state_dict(state)
    return model.float().eval()


def _inputs():
    generator = torch.Generator().manual_seed(5)
    input_ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    position_ids = torch.arange(SEQ).unsqueeze(0).expand(BATCH, -1).contiguous()
    mask = torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool).triu(1)
    return input_ids, position_ids, mask


# ------------------------------------------------------------------------------------------
# Spawned ranks
# ------------------------------------------------------------------------------------------


def _load(ckpt: Path, tp: int, pp: int):
    from megatron.early_exit import platform
    from megatron.early_exit.checkpoint.loading import build_model
    from megatron.early_exit.checkpoint.record import checkpoint_config
    from megatron.early_exit.checkpoint.store import load_checkpoint, read_checkpoint_info

    platform.initialize(tp, pp, seed=5)
    info = read_checkpoint_info(ckpt)
    config = checkpoint_config(
        info, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        pipeline_dtype=torch.float32,
    )  # fmt: skip
    model = build_model(config, info.model, seed=99)  # other weights until the load
    load_checkpoint(ckpt, model)
    return model.eval()


def _chained_logits(model) -> torch.Tensor | None:
    """Forward chained across the pipeline stages; the full logits on the last stage, else None."""
    from megatron.core import parallel_state as ps

    input_ids, position_ids, mask = _inputs()
    group = ps.get_pipeline_model_parallel_group()
    stage = ps.get_pipeline_model_parallel_rank()
    stages = ps.get_pipeline_model_parallel_world_size()
    ranks = torch.distributed.get_process_group_ranks(group)
    with torch.no_grad():
        if stage > 0:
            hidden = torch.empty(SEQ, BATCH, model.config.hidden_size)
            torch.distributed.recv(hidden, src=ranks[stage - 1], group=group)
            model.set_input_tensor(hidden)
        output, _ = model(input_ids, position_ids, mask, runtime_gather_output=True)
        if stage < stages - 1:
            torch.distributed.send(output.contiguous(), dst=ranks[stage + 1], group=group)
            return None
    return output


def layouts_worker(rank: int, world_size: int, root: str, expected: dict) -> dict:
    from megatron.early_exit import platform
    from megatron.early_exit.checkpoint.convert import hf_to_megatron

    out: dict = {}
    for family in FAMILIES:
        ckpt = Path(root) / f"{family}_ckpt"
        platform.initialize(1, 1, seed=7)  # both ranks: data-parallel replicas of one save
        hf_to_megatron(
            Path(root) / f"{family}_hf", ckpt,
            target_tensor_parallel_size=2, target_pipeline_parallel_size=2,
        )  # fmt: skip
        for layout, (tp, pp) in {"tp2": (2, 1), "pp2": (1, 2)}.items():
            logits = _chained_logits(_load(ckpt, tp, pp))
            if logits is not None:
                diff = (logits - expected[family]).abs().max().item()
                out[f"{family}/{layout}"] = (tuple(logits.shape), diff)
    return out


# ------------------------------------------------------------------------------------------
# pytest process
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    root = tmp_path_factory.mktemp("hf_layouts")
    expected = {}
    for family in FAMILIES:
        model = _hf_model(family)
        model.save_pretrained(str(root / f"{family}_hf"))
        with torch.no_grad():
            expected[family] = model(input_ids=_inputs()[0]).logits
    merged: dict = {"scale": {f: e.abs().max().item() for f, e in expected.items()}}
    for part in run_distributed(layouts_worker, 2, str(root), expected):
        merged.update(part)
    return merged


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_converted_checkpoint_matches_hf_logits_at_layout(results, family, layout):
    assert results["scale"][family] > 0.1  # not a degenerate comparison
    shape, diff = results[f"{family}/{layout}"]
    print(f"{family} {layout}: max |ours - HF| = {diff:.3g}")
    assert shape == (BATCH, SEQ, VOCAB)
    assert diff < LOGIT_TOL, (family, layout, diff)
