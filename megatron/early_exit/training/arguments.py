"""Megatron / EE-LLM command-line flags, mapped onto EE-LLM's dataclasses in one place.

``parse_args(argv)`` returns an argparse Namespace (the flag names users already type);
``build_configs(args)`` turns it into an :class:`EarlyExitTransformerConfig`, a
:class:`TrainingConfig` and the run settings. Unknown flags, conflicting flags and out-of-range
values stop with a message that names them (argparse's ``error``: exit status 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megatron.early_exit import platform
from megatron.early_exit.config import EarlyExitTransformerConfig, make_exit_heads
from megatron.early_exit.data.tokenizers import TOKENIZER_TYPES
from megatron.early_exit.exit_flags import (
    add_exit_structure_flags,
    exit_structure,
    structure_flag_problems,
    structure_flags_used,
)
from megatron.early_exit.pipeline.bubble_fill import FillConfig
from megatron.early_exit.training.loop import TrainingConfig

DEFAULT_CONFIDENCE_HIDDEN_SIZE = 64

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pretrain_early_exit_gpt.py",
        description="Train (or EE-Tune) an early-exit GPT with megatron-core.",
        allow_abbrev=False,
    )
    _model_flags(parser.add_argument_group("model"))
    _exit_flags(parser.add_argument_group("early exit"))
    _training_flags(parser.add_argument_group("training"))
    _parallel_flags(parser.add_argument_group("parallelism and precision"))
    _data_flags(parser.add_argument_group("data"))
    _checkpoint_flags(parser.add_argument_group("checkpoints and logging"))
    return parser


def _model_flags(group) -> None:
    add = group.add_argument
    add("--num-layers", type=int, default=4)
    add("--hidden-size", type=int, default=128)
    add(
        "--ffn-hidden-size",
        type=int,
        default=None,
        help="default: 4*h (8h/3 rounded to 64 with --swiglu)",
    )
    add("--num-attention-heads", type=int, default=4)
    add("--group-query-attention", action="store_true")
    add("--num-query-groups", type=int, default=None)
    add("--seq-length", type=int, default=128)
    add("--max-position-embeddings", type=int, default=None, help="default: --seq-length")
    add("--normalization", choices=("LayerNorm", "RMSNorm"), default="LayerNorm")
    add("--swiglu", action="store_true")
    add(
        "--position-embedding-type",
        choices=("learned_absolute", "rope"),
        default="learned_absolute",
    )
    add("--rotary-base", type=int, default=10000)
    add("--untie-embeddings-and-output-weights", action="store_true")
    add("--disable-bias-linear", action="store_true")
    add("--hidden-dropout", type=float, default=0.1)
    add("--attention-dropout", type=float, default=0.1)
    add("--init-method-std", type=float, default=0.02)
    add(
        "--query-key-layer-scaling",
        action="store_true",
        help="scale Q.K^T by 1/layer number (and softmax in fp32): fp16 range, same function",
    )
    add(
        "--use-flash-attn",
        action="store_true",
        help="flash attention (Transformer Engine's attention backend; needs TE and a GPU)",
    )
    add("--recompute-granularity", choices=("full", "selective"), default=None)
    add("--recompute-method", choices=("uniform", "block"), default=None)
    add("--recompute-num-layers", type=int, default=None)


def _exit_flags(group) -> None:
    add_exit_structure_flags(group)
    add = group.add_argument
    add("--exit-layer-weight", type=float, nargs="+", default=None, help="default 1.0 each")
    add("--exit-layer-weight-init", type=float, nargs="+", default=None, help="default 0.0 each")
    # Defaults are None so that --use-checkpoint-args can tell a flag given from one left out
    # (the checkpoint's value is kept only for the latter); see EXIT_OBJECTIVE_FLAGS.
    add("--exit-layer-weight-warmup-iters", type=int, default=None, help="default 0")
    add(
        "--exit-layer-weight-warmup-style",
        choices=("linear", "cosine"),
        default=None,
        help="default linear",
    )
    add("--exit-layer-temperature", type=float, nargs="+", default=None, help="default 1.0 each")
    add("--use-dynamic-exit-layer-weight", action="store_true", default=None)
    add(
        "--exit-kl-weight",
        type=float,
        default=0.0,
        help="W: each exit's loss becomes CE + W * KL(final head || exit) (0: off)",
    )
    add(
        "--exit-confidence-head",
        action="store_true",
        help="give every exit a learned confidence head (does its top-1 match the final's?)",
    )
    add("--exit-confidence-hidden-size", type=int, default=None, help="default 64")
    add("--exit-confidence-loss-weight", type=float, default=None, help="default 1.0")
    add("--fill-explicit-bubbles", action="store_true")
    add("--num-fill-warmup-microbatches", type=int, default=None)
    add("--num-fill-cooldown-microbatches", type=int, default=None)
    add("--backward-forward-ratio", type=float, default=2.0)
    add("--no-defer-exits", action="store_true", help="compute exits in the forward pass")
    add("--tune-exit", action="store_true", help="EE-Tuning: train exit heads only")
    add(
        "--tune-exit-pipeline-parallel-size",
        type=int,
        default=None,
        help="K: with --tune-exit --load, build and read only the layers up to the deepest exit, "
        "over K pipeline stages (saves still write the complete model)",
    )


def _training_flags(group) -> None:
    add = group.add_argument
    add("--micro-batch-size", type=int, default=8)
    add("--global-batch-size", type=int, default=None, help="default: micro batch x DP")
    add("--train-iters", type=int, default=300)
    add("--lr", type=float, default=2e-3)
    add("--min-lr", type=float, default=2e-4)
    add("--lr-decay-style", choices=("constant", "linear", "cosine"), default="cosine")
    add("--lr-warmup-iters", type=int, default=0)
    add(
        "--lr-warmup-fraction",
        type=float,
        default=None,
        help="warm-up as a fraction of --train-iters (instead of --lr-warmup-iters)",
    )
    add(
        "--override-opt_param-scheduler",
        action="store_true",
        help="on --load, take the LR/WD schedule from these flags, not the checkpoint",
    )
    add(
        "--use-checkpoint-opt_param-scheduler",
        action="store_true",
        help="on --load, take the LR/WD schedule from the checkpoint, whatever the flags say",
    )
    add("--weight-decay", type=float, default=0.01)
    add("--clip-grad", type=float, default=1.0)
    add("--adam-beta1", type=float, default=0.9)
    add("--adam-beta2", type=float, default=0.95)
    add("--adam-eps", type=float, default=1e-8)
    add("--seed", type=int, default=1234)


def _parallel_flags(group) -> None:
    add = group.add_argument
    add("--tensor-model-parallel-size", type=int, default=1)
    add("--pipeline-model-parallel-size", type=int, default=1)
    add("--sequence-parallel", action="store_true")
    add("--use-distributed-optimizer", action="store_true")
    add("--bf16", action="store_true")
    add("--fp16", action="store_true")
    add("--loss-scale", type=float, default=None, help="fp16: constant scale (default: dynamic)")
    add("--initial-loss-scale", type=float, default=2.0**32, help="fp16 dynamic scaling start")
    add(
        "--distributed-timeout-minutes",
        type=float,
        default=10.0,
        help="timeout of the process group and every parallel group's collectives",
    )


def _data_flags(group) -> None:
    add = group.add_argument
    add("--data-path", nargs="+", default=None, help="prefix, or 'w1 p1 w2 p2 ...'")
    add("--split", default="949,50,1")
    add("--mock-data", action="store_true")
    add("--tokenizer-type", choices=TOKENIZER_TYPES, default=None)
    add("--vocab-size", type=int, default=None)
    add("--vocab-file", default=None)
    add("--merge-file", default=None)
    add("--tokenizer-model", default=None)
    add(
        "--make-vocab-size-divisible-by",
        type=int,
        default=128,
        help="pad the vocabulary to a multiple of this x --tensor-model-parallel-size",
    )


def _checkpoint_flags(group) -> None:
    add = group.add_argument
    add("--save", default=None)
    add("--load", default=None)
    add("--save-interval", type=int, default=None)
    add("--exit-interval", type=int, default=None, help="stop (after saving) at a multiple of N")
    add("--use-checkpoint-args", action="store_true")
    add("--finetune", action="store_true")
    add("--eval-interval", type=int, default=100)
    add("--eval-iters", type=int, default=10)
    add("--log-interval", type=int, default=10)
    add("--tensorboard-dir", default=None)
    add("--metrics-file", default=None, help="one JSON object per logged iteration")
    add(
        "--log-timers-to-tracker",
        action="store_true",
        help="write each iteration's phase times (forward-backward, optimizer) to the trackers",
    )
    add("--wandb-project", default=None, help="log to Weights & Biases (pip install wandb)")
    add("--wandb-exp-name", default=None)
    add("--wandb-save-dir", default=None)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the flags; errors name the offending flag (exit status 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_args(args)
    except ValueError as error:
        parser.error(str(error))
    return args


def check_args(args: argparse.Namespace) -> None:
    """Cross-flag rules; ValueError naming the flags."""
    positive = ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "train_iters",
                "micro_batch_size", "tensor_model_parallel_size", "pipeline_model_parallel_size",
                "log_interval", "eval_interval", "make_vocab_size_divisible_by")  # fmt: skip
    for name in positive:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("hidden_dropout", "attention_dropout"):
        if not 0.0 <= getattr(args, name) < 1.0:
            raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1)")
    if args.lr < 0 or args.min_lr < 0 or args.min_lr > args.lr:
        raise ValueError(f"--lr/--min-lr: need 0 <= min-lr <= lr, got {args.min_lr}, {args.lr}")
    if args.max_position_embeddings is not None and args.max_position_embeddings < args.seq_length:
        raise ValueError(
            f"--max-position-embeddings {args.max_position_embeddings} is smaller than "
            f"--seq-length {args.seq_length}"
        )
    if args.sequence_parallel and args.tensor_model_parallel_size == 1:
        # As Megatron-LM: scripts pass --sequence-parallel for every size, TP=1 ones included.
        logger.warning(
            "--sequence-parallel is turned off: it needs --tensor-model-parallel-size > 1"
        )
        args.sequence_parallel = False
    if not args.distributed_timeout_minutes > 0:
        raise ValueError(
            f"--distributed-timeout-minutes must be > 0, got {args.distributed_timeout_minutes}"
        )
    if not args.adam_eps > 0:
        raise ValueError(f"--adam-eps must be > 0, got {args.adam_eps}")
    _check_conflicts(args)
    _check_schedule_flags(args)
    _check_tracker_flags(args)
    _check_exit_flags(args)


def _check_conflicts(args) -> None:
    pairs = [
        (args.fp16 and args.bf16, "--fp16 and --bf16 are mutually exclusive"),
        (args.mock_data and args.data_path, "--mock-data and --data-path are mutually exclusive"),
        (args.num_query_groups is not None and not args.group_query_attention,
         "--num-query-groups needs --group-query-attention"),
        (args.use_checkpoint_args and not args.load, "--use-checkpoint-args needs --load"),
        (args.finetune and not args.load, "--finetune needs --load"),
    ]  # fmt: skip
    for bad, message in pairs:
        if bad:
            raise ValueError(message)


def _check_schedule_flags(args) -> None:
    if args.lr_warmup_fraction is not None:
        if args.lr_warmup_iters:
            raise ValueError("--lr-warmup-fraction and --lr-warmup-iters are mutually exclusive")
        if not 0.0 <= args.lr_warmup_fraction <= 1.0:
            raise ValueError(
                f"--lr-warmup-fraction must be in [0, 1], got {args.lr_warmup_fraction}"
            )
    if args.override_opt_param_scheduler and args.use_checkpoint_opt_param_scheduler:
        raise ValueError(
            "--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler are "
            "mutually exclusive (take the schedule from the flags, or from the checkpoint)"
        )


def _check_tracker_flags(args) -> None:
    wandb_only = [f for f, v in (("--wandb-exp-name", args.wandb_exp_name),
                                 ("--wandb-save-dir", args.wandb_save_dir)) if v]  # fmt: skip
    if wandb_only and not args.wandb_project:
        raise ValueError(f"{', '.join(wandb_only)} need --wandb-project")
    if args.wandb_project and importlib.util.find_spec("wandb") is None:
        raise ValueError(
            "--wandb-project: the wandb package is not installed (pip install 'ee-llm[wandb]', "
            "or drop the --wandb-* flags)"
        )
    if args.log_timers_to_tracker and not (args.tensorboard_dir or args.wandb_project):
        raise ValueError(
            "--log-timers-to-tracker needs a tracker to write to: --tensorboard-dir or "
            "--wandb-project"
        )


def check_platform_flags(args) -> None:
    """Flags this platform cannot honour; ValueError saying why (called before building)."""
    if args.use_flash_attn and not platform.has_transformer_engine():
        raise ValueError(
            "--use-flash-attn needs Transformer Engine on a CUDA device (pip install -e .[gpu]); "
            "this platform runs megatron-core's local attention, which has no flash kernel"
        )


def _check_final_head_flags(args) -> None:
    """Distillation and confidence-head flags (the pipeline placement rule is the config's)."""
    if not (math.isfinite(args.exit_kl_weight) and args.exit_kl_weight >= 0):
        raise ValueError(
            f"--exit-kl-weight must be a finite number >= 0, got {args.exit_kl_weight}"
        )
    confidence_options = {
        "--exit-confidence-hidden-size": args.exit_confidence_hidden_size,
        "--exit-confidence-loss-weight": args.exit_confidence_loss_weight,
    }
    given = [flag for flag, value in confidence_options.items() if value is not None]
    if given and not args.exit_confidence_head:
        raise ValueError(f"{', '.join(given)} need --exit-confidence-head")
    size = args.exit_confidence_hidden_size
    if size is not None and size < 1:
        raise ValueError(f"--exit-confidence-hidden-size must be >= 1, got {size}")
    weight = args.exit_confidence_loss_weight
    if weight is not None and not (math.isfinite(weight) and weight >= 0):
        raise ValueError(
            f"--exit-confidence-loss-weight must be a finite number >= 0, got {weight}"
        )
    uses_final_head = [
        flag
        for flag, on in (
            ("--exit-kl-weight", args.exit_kl_weight > 0),
            ("--exit-confidence-head", args.exit_confidence_head),
        )
        if on
    ]
    if uses_final_head and args.tune_exit_pipeline_parallel_size is not None:
        raise ValueError(
            f"{', '.join(uses_final_head)}: the exits learn from the final head, which "
            "--tune-exit-pipeline-parallel-size leaves out of the model; tune with the full "
            "pipeline"
        )


def _check_exit_flags(args) -> None:
    exit_only = {
        "--exit-layer-weight": args.exit_layer_weight is not None,
        "--use-dynamic-exit-layer-weight": args.use_dynamic_exit_layer_weight,
        "--exit-kl-weight": args.exit_kl_weight != 0.0,
        "--exit-confidence-head": args.exit_confidence_head,
        "--fill-explicit-bubbles": args.fill_explicit_bubbles,
        "--tune-exit": args.tune_exit,
    }
    if not args.exit_layer_nums and not args.use_checkpoint_args:  # else exits come from --load
        used = structure_flags_used(args) + [flag for flag, on in exit_only.items() if on]
        if used:
            raise ValueError(f"{', '.join(used)} given without --exit-layer-nums")
    problems = structure_flag_problems(args)
    if problems:
        raise ValueError("; ".join(problems))
    _check_final_head_flags(args)
    fill_counts = args.num_fill_warmup_microbatches, args.num_fill_cooldown_microbatches
    if any(c is not None for c in fill_counts) and not args.fill_explicit_bubbles:
        raise ValueError("--num-fill-*-microbatches need --fill-explicit-bubbles")
    if args.fill_explicit_bubbles and args.pipeline_model_parallel_size < 2:
        raise ValueError("--fill-explicit-bubbles needs --pipeline-model-parallel-size >= 2")
    if args.fill_explicit_bubbles and args.tune_exit:
        raise ValueError("--fill-explicit-bubbles and --tune-exit are mutually exclusive")
    num_tune_stages = args.tune_exit_pipeline_parallel_size
    if num_tune_stages is not None and not args.tune_exit:
        raise ValueError("--tune-exit-pipeline-parallel-size needs --tune-exit")
    if num_tune_stages is not None and num_tune_stages < 1:
        raise ValueError(f"--tune-exit-pipeline-parallel-size must be >= 1, got {num_tune_stages}")
    if num_tune_stages is not None and not args.load:
        # Whether K fits the exits is checked once they are known (run.partial_num_layers).
        raise ValueError(
            "--tune-exit-pipeline-parallel-size needs --load: the checkpoint whose layers up "
            "to the deepest exit are loaded, and from which saves copy the rest of the model"
        )


@dataclass(frozen=True)
class RunSettings:
    """Everything of a run that is neither the model config nor the optimisation config."""

    mode: str  # "train" or "tune"
    fill: FillConfig | None
    defer_exits: bool
    micro_batch_size: int
    num_microbatches: int
    use_distributed_optimizer: bool
    position_embedding_type: str
    rotary_base: int


def model_config(args, vocab_size: int) -> EarlyExitTransformerConfig:
    """The EarlyExitTransformerConfig the flags describe (platform overrides merged in)."""
    exits = make_exit_heads(
        args.exit_layer_nums,
        pre_exit=args.pre_exit,
        structure=exit_structure(args),
        loss_weights=args.exit_layer_weight,
        loss_weights_init=args.exit_layer_weight_init,
        temperatures=args.exit_layer_temperature,
        untied=args.untie_exit_output_weights,
        confidence_hidden_size=confidence_hidden_size(args),
    )
    fields = dict(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=_ffn_hidden_size(args),
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups,
        normalization=args.normalization,
        add_bias_linear=not args.disable_bias_linear,
        hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout,
        init_method_std=args.init_method_std,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        sequence_parallel=args.sequence_parallel,
        bf16=args.bf16,
        fp16=args.fp16,
        params_dtype=_dtype(args),
        pipeline_dtype=_dtype(args),
        exit_heads=exits,
        exit_loss_weight_warmup_iters=args.exit_layer_weight_warmup_iters or 0,
        exit_loss_weight_warmup_style=args.exit_layer_weight_warmup_style or "linear",
        include_final_loss=not args.tune_exit,
        dynamic_exit_loss_weight=bool(args.use_dynamic_exit_layer_weight),
        untie_embeddings_and_output_weights=args.untie_embeddings_and_output_weights,
        exit_kl_weight=args.exit_kl_weight,
    )
    if args.exit_confidence_loss_weight is not None:
        fields["exit_confidence_loss_weight"] = args.exit_confidence_loss_weight
    if args.swiglu:
        fields.update(gated_linear_unit=True, activation_func=F.silu)
    fields.update(platform.config_overrides())
    fields.update(runtime_config_fields(args))
    return EarlyExitTransformerConfig(**fields)


def runtime_config_fields(args) -> dict:
    """Config fields that change how the model computes, not what (recomputation, attention
    kernel, QK scaling): taken from the flags under ``--use-checkpoint-args`` too."""
    fields = dict(
        recompute_granularity=args.recompute_granularity,
        recompute_method=args.recompute_method,
        recompute_num_layers=args.recompute_num_layers,
    )
    if args.query_key_layer_scaling:
        fields["apply_query_key_layer_scaling"] = True
    if args.use_flash_attn:
        from megatron.core.transformer.enums import AttnBackend

        fields["attention_backend"] = AttnBackend.flash
    return fields


# The exit-objective flags that --use-checkpoint-args keeps from the command line when given:
# flag -> (argparse name, ExitHeadConfig field or config field, per exit?)
EXIT_OBJECTIVE_FLAGS = {
    "--exit-layer-weight": ("exit_layer_weight", "loss_weight", True),
    "--exit-layer-weight-init": ("exit_layer_weight_init", "loss_weight_init", True),
    "--exit-layer-temperature": ("exit_layer_temperature", "temperature", True),
    "--exit-layer-weight-warmup-iters": (
        "exit_layer_weight_warmup_iters", "exit_loss_weight_warmup_iters", False,
    ),
    "--exit-layer-weight-warmup-style": (
        "exit_layer_weight_warmup_style", "exit_loss_weight_warmup_style", False,
    ),
    "--use-dynamic-exit-layer-weight": (
        "use_dynamic_exit_layer_weight", "dynamic_exit_loss_weight", False,
    ),
}  # fmt: skip


def exit_objective_from_flags(args, exit_heads: tuple) -> dict:
    """``--use-checkpoint-args``: the exit-objective flags given on this command line, as config
    overrides on top of the checkpoint's exits ``exit_heads`` (flags left out keep the
    checkpoint's values). ValueError when a per-exit list does not have one value per exit."""
    heads = list(exit_heads)
    overrides: dict = {}
    for flag, (name, field, per_exit) in EXIT_OBJECTIVE_FLAGS.items():
        value = getattr(args, name)
        if value is None:
            continue
        if not per_exit:
            overrides[field] = value
            continue
        if len(value) != len(heads):
            raise ValueError(
                f"{flag}: got {len(value)} values, but the checkpoint has {len(heads)} exits "
                f"(after layers {[e.layer_number for e in heads]}); give one value per exit"
            )
        heads = [dataclasses.replace(e, **{field: v}) for e, v in zip(heads, value, strict=True)]
    overrides["exit_heads"] = tuple(heads)
    return overrides


def confidence_hidden_size(args) -> int:
    """Width of every exit's confidence head the flags ask for (0: none)."""
    if not args.exit_confidence_head:
        return 0
    return args.exit_confidence_hidden_size or DEFAULT_CONFIDENCE_HIDDEN_SIZE


def _ffn_hidden_size(args) -> int:
    if args.ffn_hidden_size is not None:
        return args.ffn_hidden_size
    if args.swiglu:  # Megatron-LM's default keeps the parameter count of a 4h GeLU MLP
        return int((4 * args.hidden_size * 2 / 3) / 64) * 64 or 64
    return 4 * args.hidden_size


def params_dtype(args) -> torch.dtype:
    """The parameter dtype ``--bf16``/``--fp16`` select (fp32 otherwise)."""
    return _dtype(args)


def _dtype(args) -> torch.dtype:
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32


def training_config(args) -> TrainingConfig:
    return TrainingConfig(
        train_iters=args.train_iters,
        lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_iters=lr_warmup_iters(args),
        lr_decay_style=args.lr_decay_style,
        weight_decay=args.weight_decay,
        clip_grad=args.clip_grad,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        adam_eps=args.adam_eps,
        log_interval=args.log_interval,
        loss_scale=args.loss_scale,
        initial_loss_scale=args.initial_loss_scale,
        scheduler_source=(
            "flags"
            if args.override_opt_param_scheduler
            else "checkpoint"
            if args.use_checkpoint_opt_param_scheduler
            else "check"
        ),
    )


def lr_warmup_iters(args) -> int:
    """``--lr-warmup-iters``, or ``--lr-warmup-fraction`` of ``--train-iters`` (Megatron's
    rounding down)."""
    if args.lr_warmup_fraction is not None:
        return int(args.lr_warmup_fraction * args.train_iters)
    return args.lr_warmup_iters


def run_settings(args, data_parallel_size: int) -> RunSettings:
    """Batch arithmetic and schedule options; ValueError naming the flags."""
    per_step = args.micro_batch_size * data_parallel_size
    global_batch = args.global_batch_size or per_step
    if global_batch % per_step:
        raise ValueError(
            f"--global-batch-size {global_batch} is not divisible by --micro-batch-size x "
            f"data-parallel size = {per_step}"
        )
    fill = None
    if args.fill_explicit_bubbles:
        fill = FillConfig(
            args.num_fill_warmup_microbatches,
            args.num_fill_cooldown_microbatches,
            backward_forward_ratio=args.backward_forward_ratio,
        )
    return RunSettings(
        mode="tune" if args.tune_exit else "train",
        fill=fill,
        defer_exits=not args.no_defer_exits,
        micro_batch_size=args.micro_batch_size,
        num_microbatches=global_batch // per_step,
        use_distributed_optimizer=args.use_distributed_optimizer,
        position_embedding_type=args.position_embedding_type,
        rotary_base=args.rotary_base,
    )
