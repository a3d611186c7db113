"""Flag parsing: every early-exit flag reaches the configs; bad flags stop with their name."""

from __future__ import annotations

import pytest

from megatron.early_exit.training import arguments

EXIT_FLAGS = (
    "--num-layers 8 --exit-layer-nums 3 5 --pre-exit --untie-exit-output-weights "
    "--use-exit-norm --use-exit-mlp --exit-layer-weight 0.25 0.5 "
    "--exit-layer-weight-init 0.1 0.2 --exit-layer-weight-warmup-iters 7 "
    "--exit-layer-weight-warmup-style cosine --exit-layer-temperature 2.0 3.0 "
    "--use-dynamic-exit-layer-weight"
)


def parse(flags: str):
    return arguments.parse_args(flags.split())


def test_every_early_exit_flag_reaches_the_config():
    config = arguments.model_config(parse(EXIT_FLAGS), vocab_size=256)
    heads = config.exit_heads
    assert [(h.layer_number, h.pre_exit, h.depth) for h in heads] == [(3, True, 2), (5, True, 4)]
    assert {h.structure for h in heads} == {"mlp"} and all(h.untied for h in heads)
    assert [h.loss_weight for h in heads] == [0.25, 0.5]
    assert [h.loss_weight_init for h in heads] == [0.1, 0.2]
    assert [h.temperature for h in heads] == [2.0, 3.0]
    assert config.exit_loss_weight_warmup_iters == 7
    assert config.exit_loss_weight_warmup_style == "cosine"
    assert config.dynamic_exit_loss_weight and config.include_final_loss


@pytest.mark.parametrize(
    ("flags", "structure"),
    [("", "head"), ("--use-exit-norm", "norm"), ("--use-exit-norm --use-exit-mlp", "mlp"),
     ("--use-exit-norm --use-exit-block", "block")],
)  # fmt: skip
def test_exit_structure_flags(flags, structure):
    args = parse(f"--exit-layer-nums 2 {flags}")
    assert arguments.model_config(args, 256).exit_heads[0].structure == structure


def test_model_flags_reach_the_config():
    args = parse(
        "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --group-query-attention "
        "--num-query-groups 2 --normalization RMSNorm --swiglu --disable-bias-linear "
        "--untie-embeddings-and-output-weights --exit-layer-nums 1 --untie-exit-output-weights "
        "--hidden-dropout 0.0 --attention-dropout 0.05 --init-method-std 0.01"
    )
    config = arguments.model_config(args, 256)
    assert config.num_query_groups == 2 and config.gated_linear_unit
    assert config.ffn_hidden_size == 128  # Megatron's SwiGLU default: 8h/3 rounded down to 64
    assert not config.add_bias_linear and config.untie_embeddings_and_output_weights
    assert (config.hidden_dropout, config.attention_dropout, config.init_method_std) == (
        0.0,
        0.05,
        0.01,
    )


def test_schedule_flags_reach_the_run_settings():
    args = parse(
        "--pipeline-model-parallel-size 4 --exit-layer-nums 1 2 --fill-explicit-bubbles "
        "--num-fill-warmup-microbatches 1 --backward-forward-ratio 3 --micro-batch-size 2 "
        "--global-batch-size 16 --no-defer-exits"
    )
    settings = arguments.run_settings(args, data_parallel_size=2)
    assert settings.num_microbatches == 4 and not settings.defer_exits
    assert settings.fill.num_fill_warmup_microbatches == 1
    assert settings.fill.backward_forward_ratio == 3.0
    tune = arguments.run_settings(parse("--exit-layer-nums 1 --tune-exit"), 1)
    assert tune.mode == "tune"
    assert not arguments.model_config(
        parse("--exit-layer-nums 1 --tune-exit"), 256
    ).include_final_loss


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ("--exit-layer-nums 9", "exit layer number: 9 is out of range"),
        ("--exit-layer-nums 1 2 --exit-layer-weight 0.5", "loss_weights: got 1 values for 2"),
        ("--exit-layer-nums 1 --exit-layer-weight -1", "loss_weight"),
        ("--exit-layer-nums 2 --pre-exit --exit-layer-nums 1 2 3", None),
    ],
)
def test_config_level_errors_name_the_field(flags, message):
    if message is None:
        arguments.model_config(parse(flags), 256)
        return
    with pytest.raises(ValueError, match=message):
        arguments.model_config(parse(flags), 256)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ("--no-such-flag", "unrecognized arguments: --no-such-flag"),
        ("--fp16 --bf16", "--fp16 and --bf16"),
        ("--lr-warmup-fraction 0.1 --lr-warmup-iters 5", "--lr-warmup-fraction and --lr-warmup"),
        ("--lr-warmup-fraction 1.5", "--lr-warmup-fraction must be in [0, 1]"),
        ("--override-opt_param-scheduler --use-checkpoint-opt_param-scheduler", "exclusive"),
        ("--adam-eps 0", "--adam-eps must be > 0"),
        ("--distributed-timeout-minutes 0", "--distributed-timeout-minutes must be > 0"),
        ("--make-vocab-size-divisible-by 0", "--make-vocab-size-divisible-by must be >= 1"),
        ("--wandb-exp-name x", "--wandb-exp-name need --wandb-project"),
        ("--log-timers-to-tracker", "--log-timers-to-tracker needs a tracker"),
        ("--recompute-granularity bogus", "invalid choice: 'bogus'"),
        ("--use-exit-norm", "--use-exit-norm given without --exit-layer-nums"),
        ("--exit-layer-nums 1 --use-exit-mlp", "--use-exit-mlp/--use-exit-block need"),
        ("--exit-layer-nums 1 --use-exit-norm --use-exit-mlp --use-exit-block", "exclusive"),
        ("--exit-layer-nums 1 --fill-explicit-bubbles", "--pipeline-model-parallel-size >= 2"),
        ("--num-layers 0", "--num-layers must be >= 1"),
        ("--hidden-dropout 1.5", "--hidden-dropout must be in"),
        ("--lr 0.001 --min-lr 0.01", "min-lr <= lr"),
        ("--mock-data --data-path x", "mutually exclusive"),
        ("--finetune", "--finetune needs --load"),
        ("--normalization BatchNorm", "invalid choice: 'BatchNorm'"),
        ("--exit-layer-nums 1 --tune-exit-pipeline-parallel-size 2", "needs --tune-exit"),
        ("--exit-layer-nums 1 --tune-exit --tune-exit-pipeline-parallel-size 1", "needs --load"),
        ("--exit-layer-nums 1 --tune-exit --tune-exit-pipeline-parallel-size 0", "must be >= 1"),
    ],
)
def test_bad_flags_stop_with_their_name(flags, message, capsys):
    with pytest.raises(SystemExit) as stopped:
        parse(flags)
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err


def test_tuning_a_checkpoint_takes_its_exits_from_the_checkpoint():
    args = parse("--load ckpt --use-checkpoint-args --finetune --tune-exit")
    assert args.tune_exit and args.exit_layer_nums == []


def test_global_batch_must_divide():
    args = parse("--micro-batch-size 3 --global-batch-size 10")
    with pytest.raises(ValueError, match="--global-batch-size 10 is not divisible"):
        arguments.run_settings(args, data_parallel_size=1)


def test_sequence_parallel_at_tp1_is_turned_off_with_a_warning(caplog):
    """Megatron's rule: examples pass --sequence-parallel for every size, TP=1 ones too."""
    with caplog.at_level("WARNING"):
        args = parse("--sequence-parallel")
    assert args.sequence_parallel is False
    assert "--sequence-parallel is turned off" in caplog.text
    args = parse("--sequence-parallel --tensor-model-parallel-size 2")
    assert args.sequence_parallel is True and arguments.model_config(args, 256).sequence_parallel


def test_parity_flags_reach_the_configs():
    args = parse(
        "--adam-eps 1e-5 --lr-warmup-fraction 0.25 --train-iters 40 --query-key-layer-scaling "
        "--distributed-timeout-minutes 2.5 --make-vocab-size-divisible-by 64 "
        "--recompute-granularity selective"
    )
    training = arguments.training_config(args)
    assert training.adam_eps == 1e-5 and training.lr_warmup_iters == 10
    config = arguments.model_config(args, 256)
    assert config.apply_query_key_layer_scaling and config.attention_softmax_in_fp32
    assert config.recompute_granularity == "selective"
    assert args.distributed_timeout_minutes == 2.5 and args.make_vocab_size_divisible_by == 64
    full = parse("--recompute-granularity full --recompute-method block --recompute-num-layers 2")
    config = arguments.model_config(full, 256)
    assert (config.recompute_method, config.recompute_num_layers) == ("block", 2)


def test_padded_vocab_size_honours_make_vocab_size_divisible_by():
    from megatron.early_exit.training.run import padded_vocab_size

    assert padded_vocab_size(1000, 2) == 1024
    assert padded_vocab_size(1000, 2, 64) == 1024
    assert padded_vocab_size(1000, 1, 64) == 1024
    assert padded_vocab_size(1000, 1, 8) == 1000
    assert padded_vocab_size(1001, 3, 1) == 1002


def test_wandb_missing_is_a_clear_error(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    with pytest.raises(SystemExit):
        parse("--wandb-project p --wandb-exp-name e")
    assert "the wandb package is not installed" in capsys.readouterr().err


def test_flash_attention_refused_without_transformer_engine(monkeypatch):
    from megatron.early_exit import platform

    monkeypatch.setattr(platform, "has_transformer_engine", lambda: False)
    with pytest.raises(ValueError, match="--use-flash-attn needs Transformer Engine"):
        arguments.check_platform_flags(parse("--use-flash-attn"))
    monkeypatch.setattr(platform, "has_transformer_engine", lambda: True)
    args = parse("--use-flash-attn")
    arguments.check_platform_flags(args)
    assert arguments.runtime_config_fields(args)["attention_backend"].name == "flash"


def test_llama2_tokenizer_starts_every_text_with_bos(tmp_path):
    from megatron.early_exit.data.default_corpus import default_training_data
    from megatron.early_exit.data.tokenizers import build_tokenizer

    model = default_training_data().tokenizer_model
    plain = build_tokenizer("SentencePieceTokenizer", tokenizer_model=model)
    llama2 = build_tokenizer("Llama2Tokenizer", tokenizer_model=model)
    assert llama2.bos is not None
    assert llama2.tokenize("The jury said") == [llama2.bos, *plain.tokenize("The jury said")]
    assert parse("--tokenizer-type Llama2Tokenizer").tokenizer_type == "Llama2Tokenizer"


def test_exit_objective_flags_given_win_over_the_checkpoint():
    from megatron.early_exit.config import ExitHeadConfig

    heads = (ExitHeadConfig(2, loss_weight=0.1, temperature=3.0),
             ExitHeadConfig(4, loss_weight=0.2, temperature=4.0))  # fmt: skip
    args = parse("--use-checkpoint-args --load x --exit-layer-weight 0.5 0.7 "
                 "--exit-layer-weight-warmup-iters 9")  # fmt: skip
    overrides = arguments.exit_objective_from_flags(args, heads)
    assert [e.loss_weight for e in overrides["exit_heads"]] == [0.5, 0.7]
    assert [e.temperature for e in overrides["exit_heads"]] == [3.0, 4.0]  # not given: kept
    assert overrides["exit_loss_weight_warmup_iters"] == 9
    assert "dynamic_exit_loss_weight" not in overrides
    assert "exit_loss_weight_warmup_style" not in overrides
    args = parse("--use-checkpoint-args --load x --exit-layer-weight 0.5")
    with pytest.raises(ValueError, match="got 1 values, but the checkpoint has 2 exits"):
        arguments.exit_objective_from_flags(args, heads)
