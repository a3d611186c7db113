"""The settings, models, microbatches and configurations (:class:`Case`) of each suite."""

from __future__ import annotations

from dataclasses import dataclass

SEED = 1234


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
