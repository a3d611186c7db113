"""Tiny models, batches and comparisons shared by the test tiers."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron.early_exit import platform
from megatron.early_exit.config import EarlyExitTransformerConfig, ExitHeadConfig

VOCAB = 64
SEQ = 16
BATCH = 2

# Two backbone families; each uses every exit structure at least once.
FAMILIES = {
    "gpt": dict(
        model=dict(normalization="LayerNorm", add_bias_linear=True),
        position_embedding_type="learned_absolute",
        exits=(
            ExitHeadConfig(1, structure="head", loss_weight=0.3),
            ExitHeadConfig(2, structure="norm", loss_weight=0.5),
            ExitHeadConfig(4, pre_exit=True, structure="mlp", loss_weight=0.7),
            ExitHeadConfig(4, structure="block", loss_weight=1.1, untied=True),
        ),
    ),
    "llama": dict(
        model=dict(
            normalization="RMSNorm",
            add_bias_linear=False,
            gated_linear_unit=True,
            activation_func=F.silu,
            num_query_groups=2,
            untie_embeddings_and_output_weights=True,
            dynamic_exit_loss_weight=True,  # exercises the vocab-parallel max-prob reduction
        ),
        position_embedding_type="rope",
        exits=(
            ExitHeadConfig(1, structure="block", loss_weight=0.4, untied=True),
            ExitHeadConfig(2, structure="mlp", loss_weight=0.6, untied=True, temperature=1.5),
            ExitHeadConfig(3, structure="norm", loss_weight=0.8, untied=True),
            ExitHeadConfig(4, structure="head", loss_weight=1.0, untied=True),
        ),
    ),
}


def tiny_config(
    family: str = "gpt",
    *,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    sequence_parallel: bool = False,
    **overrides,
) -> EarlyExitTransformerConfig:
    spec = FAMILIES[family]
    fields = dict(
        num_layers=4,
        hidden_size=32,
        ffn_hidden_size=64,
        num_attention_heads=4,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.05,
        exit_heads=spec["exits"],
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        sequence_parallel=sequence_parallel,
        **spec["model"],
    )
    if pipeline_model_parallel_size > 1:
        fields["pipeline_dtype"] = torch.float32
    fields.update(platform.config_overrides())
    fields.update(overrides)
    return EarlyExitTransformerConfig(**fields)


def position_embedding_type(family: str) -> str:
    return FAMILIES[family]["position_embedding_type"]


def make_batch(seed: int, batch: int = BATCH, seq: int = SEQ, vocab: int = VOCAB) -> dict:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch, seq + 1), generator=generator)
    loss_mask = torch.ones(batch, seq)
    loss_mask[0, :3] = 0.0  # exercise masking
    return {
        "input_ids": tokens[:, :-1].contiguous(),
        "labels": tokens[:, 1:].contiguous(),
        "position_ids": torch.arange(seq).unsqueeze(0).expand(batch, -1).contiguous(),
        "attention_mask": torch.ones(1, 1, seq, seq, dtype=torch.bool).triu(1),
        "loss_mask": loss_mask,
    }


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (absolute when expected is all zeros)."""
    actual, expected = actual.double(), expected.double()
    scale = expected.abs().max().item()
    diff = (actual - expected).abs().max().item()
    return diff / scale if scale > 0 else diff


def backward_and_gather(ddp, model, config, batch: dict, final, exit_losses: dict) -> dict:
    """One training step's reference numbers from per-token losses already computed by ``ddp``:
    masked means per head, the weighted total's backward, ``finalize_model_grads``, every
    parameter's TP-gathered ``main_grad``, then the eval-mode forward's gathered logits.

    Returns ``{"losses": {head: tensor}, "grads": {name: tensor}, "final_logits", "exit_logits"}``
    (``head`` is ``"final"`` or an exit depth).
    """
    from megatron.core import parallel_state
    from megatron.core.distributed import finalize_model_grads

    from megatron.early_exit.model.losses import masked_mean, weighted_total_loss
    from megatron.early_exit.model.sharding import gather

    mask = batch["loss_mask"]
    losses = {"final": masked_mean(final, mask)}
    losses.update({d: masked_mean(v, mask) for d, v in exit_losses.items()})
    weights = {e.depth: e.loss_weight for e in config.exit_heads}
    total = weighted_total_loss(losses["final"], {d: losses[d] for d in exit_losses}, weights)
    ddp.zero_grad_buffer()
    total.backward()
    finalize_model_grads([ddp])
    group = parallel_state.get_tensor_model_parallel_group()
    grads = {n: gather(p.main_grad, p, group) for n, p in model.named_parameters()}
    model.eval()
    with torch.no_grad():
        final_logits, exit_logits = model(
            batch["input_ids"], batch["position_ids"], batch["attention_mask"],
            runtime_gather_output=True,
        )  # fmt: skip
    return {"losses": losses, "grads": grads, "final_logits": final_logits,
            "exit_logits": exit_logits}  # fmt: skip


def all_logits(model, batch: dict) -> dict:
    """``{"final": ..., "exit_<depth>": ...}`` gathered logits ``[b, s, v]`` of one eval forward
    of ``batch`` (``make_batch``'s keys)."""
    model.eval()
    with torch.no_grad():
        final, exits = model(
            batch["input_ids"], batch["position_ids"], batch["attention_mask"],
            runtime_gather_output=True,
        )  # fmt: skip
    return {"final": final, **{f"exit_{d}": v for d, v in exits.items()}}


def no_cache_forward(model, sequence: torch.Tensor):
    """``(final, exits)`` gathered logits of megatron's own causal forward over ``sequence``
    ``[b, n]``, without a KV cache: the oracle decoding tests compare against."""
    n = sequence.shape[1]
    causal = torch.ones(1, 1, n, n, dtype=torch.bool).triu(1)
    positions = torch.arange(n).unsqueeze(0).expand(sequence.shape[0], -1)
    with torch.no_grad():
        return model(sequence, positions, causal, runtime_gather_output=True)


def tiny_hf_model(family: str, num_layers: int = 3):
    """A small random HF ``LlamaForCausalLM`` (untied, GQA, RoPE) or ``GPT2LMHeadModel`` (tied),
    float32, eval mode, with weights far from their initialisation."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed({"llama": 1, "gpt2": 2}[family])
    if family == "llama":
        config = LlamaConfig(
            vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=num_layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            tie_word_embeddings=False, rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
            bos_token_id=1, eos_token_id=2, pad_token_id=None,
        )  # fmt: skip
        model = LlamaForCausalLM(config)
    else:
        config = GPT2Config(
            vocab_size=128, n_embd=64, n_layer=num_layers, n_head=4, n_positions=32,
            bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
        model = GPT2LMHeadModel(config)
    with torch.no_grad():  # attention far from uniform, norms not the identity, biases not 0
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(0.1 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.15)
    return model.float().eval()
