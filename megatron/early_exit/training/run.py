"""What ``pretrain_early_exit_gpt.py`` runs: flags -> configs -> data, model, trainer -> loop.

The loop reads top to bottom: each iteration takes its microbatches (and bubble-fill
microbatches) from the data position, runs one optimizer step through the early-exit pipeline
schedule, logs, evaluates and saves at their intervals.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from megatron.core import parallel_state

from megatron.early_exit import platform
from megatron.early_exit.data.datasets import build_gpt_datasets
from megatron.early_exit.data.default_corpus import default_training_data
from megatron.early_exit.data.tokenizers import build_tokenizer
from megatron.early_exit.model.builder import build_early_exit_model
from megatron.early_exit.model.placement import stages_with_exits, tied_exit_stages
from megatron.early_exit.pipeline.bubble_fill import build_fill_schedule
from megatron.early_exit.training import arguments
from megatron.early_exit.training.batches import causal_mask
from megatron.early_exit.training.checkpointing import (
    config_from_checkpoint,
    load_checkpoint,
    read_checkpoint_info,
    save_checkpoint,
)
from megatron.early_exit.training.logging import RunLogger
from megatron.early_exit.training.loop import Trainer, evaluate, setup_trainer, train_step


@dataclass
class DataSource:
    """Deterministic microbatches by position: iteration t, data-parallel rank r."""

    train: object
    valid: object | None
    micro_batch_size: int
    num_microbatches: int
    num_fill: int
    data_parallel_rank: int
    data_parallel_size: int

    @property
    def samples_per_iteration(self) -> int:
        per_replica = self.micro_batch_size * (self.num_microbatches + self.num_fill)
        return per_replica * self.data_parallel_size

    def iteration(self, iteration: int) -> tuple[list[dict], list[dict]]:
        """The real and fill microbatches of ``iteration`` on this data-parallel rank."""
        per_replica = self.micro_batch_size * (self.num_microbatches + self.num_fill)
        start = iteration * self.samples_per_iteration + self.data_parallel_rank * per_replica
        batches = [
            self._batch(self.train, start + i * self.micro_batch_size)
            for i in range(self.num_microbatches + self.num_fill)
        ]
        return batches[: self.num_microbatches], batches[self.num_microbatches :]

    def validation(self, num_batches: int) -> list[dict]:
        return [self._batch(self.valid, i * self.micro_batch_size) for i in range(num_batches)]

    def _batch(self, dataset, start: int) -> dict:
        samples = [dataset[(start + i) % len(dataset)] for i in range(self.micro_batch_size)]
        tokens = torch.stack([torch.as_tensor(s["tokens"]) for s in samples]).long()
        seq_length = tokens.shape[1]
        batch = {
            "input_ids": tokens,
            "labels": torch.stack([torch.as_tensor(s["labels"]) for s in samples]).long(),
            "loss_mask": torch.stack([torch.as_tensor(s["loss_mask"]) for s in samples]).float(),
            "position_ids": torch.stack([torch.as_tensor(s["position_ids"]) for s in samples]),
            "attention_mask": causal_mask(seq_length),
        }
        return {k: v.to(platform.device()) for k, v in batch.items()}


def padded_vocab_size(vocab_size: int, tensor_model_parallel_size: int) -> int:
    """Megatron-LM's padding: a multiple of 128 * TP."""
    multiple = 128 * tensor_model_parallel_size
    return -(-vocab_size // multiple) * multiple


def build_tokenizer_from_args(args) -> tuple[object, dict]:
    """The tokenizer (default: the bundled corpus's) and its description for checkpoints."""
    if not args.mock_data and args.data_path is None:
        default = default_training_data()
        if args.tokenizer_type is None:
            args.tokenizer_type = "SentencePieceTokenizer"
            args.tokenizer_model = default.tokenizer_model
        if (args.tokenizer_type, args.tokenizer_model) != (
            "SentencePieceTokenizer",
            default.tokenizer_model,
        ):
            arguments.build_parser().error(
                f"--data-path is required with --tokenizer-type {args.tokenizer_type} (the "
                f"default corpus is tokenized with {default.tokenizer_model})"
            )
        args.data_path = [default.data_prefix]
    if args.tokenizer_type is None:
        args.tokenizer_type = "NullTokenizer" if args.mock_data else "GPT2BPETokenizer"
    if args.mock_data and args.vocab_size is None and args.tokenizer_type == "NullTokenizer":
        args.vocab_size = 1024
    info = {
        "tokenizer_type": args.tokenizer_type,
        "vocab_file": args.vocab_file,
        "merge_file": args.merge_file,
        "tokenizer_model": args.tokenizer_model,
        "vocab_size": args.vocab_size,
    }
    kwargs = {k: v for k, v in info.items() if k != "tokenizer_type"}
    return build_tokenizer(args.tokenizer_type, **kwargs), info


def build_data(args, tokenizer, settings, num_fill: int) -> DataSource:
    dp_size = parallel_state.get_data_parallel_world_size()
    per_iteration = settings.micro_batch_size * (settings.num_microbatches + num_fill) * dp_size
    eval_samples = args.eval_iters * settings.micro_batch_size
    datasets = build_gpt_datasets(
        tokenizer,
        seq_length=args.seq_length,
        seed=args.seed,
        num_samples=(args.train_iters * per_iteration, eval_samples, 0),
        data_path=args.data_path,
        split=args.split,
        mock_data=args.mock_data,
    )
    return DataSource(
        datasets.train,
        datasets.valid,
        settings.micro_batch_size,
        settings.num_microbatches,
        num_fill,
        parallel_state.get_data_parallel_rank(),
        dp_size,
    )


def main(argv: list[str] | None = None) -> dict:
    """Train; returns the final evaluation (``lm_loss`` and every ``exit_<depth>``)."""
    args = arguments.parse_args(argv)
    info = read_checkpoint_info(args.load) if args.use_checkpoint_args else None
    if info is not None:
        _apply_checkpoint_args(args, info)
    tokenizer, tokenizer_info = build_tokenizer_from_args(args)
    vocab_size = padded_vocab_size(tokenizer.vocab_size, args.tensor_model_parallel_size)
    config = _config_or_exit(args, vocab_size)
    if info is not None:  # the checkpoint's model (activation, exits, vocab) in this run's layout
        config, vocab_size = _checkpoint_config(args, info), info.model["vocab_size"]
    platform.initialize(
        args.tensor_model_parallel_size,
        args.pipeline_model_parallel_size,
        seed=args.seed,
        embedding_stages=tied_exit_stages(config),
    )
    settings = arguments.run_settings(args, parallel_state.get_data_parallel_world_size())
    num_fill = _num_fill(config, settings)
    data = build_data(args, tokenizer, settings, num_fill)
    model = build_early_exit_model(
        config,
        vocab_size,
        args.max_position_embeddings or args.seq_length,
        position_embedding_type=settings.position_embedding_type,
        rotary_base=settings.rotary_base,
    )
    trainer = setup_trainer(
        model,
        arguments.training_config(args),
        mode=settings.mode,
        fill=settings.fill,
        defer_exits=settings.defer_exits,
        distributed_optimizer=settings.use_distributed_optimizer,
    )
    if args.load:
        trainer.iteration = load_checkpoint(args.load, trainer, finetune=args.finetune)
    logger = RunLogger(
        args, config, tokens_per_iteration=data.samples_per_iteration * args.seq_length
    )
    result = _train_loop(args, trainer, data, logger, tokenizer_info)
    logger.close()
    platform.destroy()
    return result


def _train_loop(args, trainer: Trainer, data: DataSource, logger, tokenizer_info) -> dict:
    logger.start(trainer.iteration)
    while trainer.iteration < args.train_iters:
        start = time.perf_counter()
        microbatches, fills = data.iteration(trainer.iteration)
        metrics = train_step(trainer, microbatches, fills)
        logger.iteration(metrics, time.perf_counter() - start)
        if data.valid is not None and trainer.iteration % args.eval_interval == 0:
            logger.evaluation(
                trainer.iteration, evaluate(trainer, data.validation(args.eval_iters))
            )
        if args.save and args.save_interval and trainer.iteration % args.save_interval == 0:
            _save(args, trainer, data, tokenizer_info)
        if args.exit_interval and trainer.iteration % args.exit_interval == 0:
            break  # Megatron's --exit-interval: the final save below makes it resumable
    final = evaluate(trainer, data.validation(args.eval_iters)) if data.valid is not None else {}
    logger.final(trainer.iteration, final)
    if args.save:
        _save(args, trainer, data, tokenizer_info)
    return final


def _save(args, trainer, data: DataSource, tokenizer_info: dict) -> None:
    consumed = trainer.iteration * data.samples_per_iteration
    save_checkpoint(
        args.save,
        trainer,
        data_state={"consumed_samples": consumed},
        model_args={"tokenizer": tokenizer_info, "seq_length": args.seq_length},
    )


def _checkpoint_config(args, info):
    dtype = arguments.params_dtype(args)
    overrides = dict(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        sequence_parallel=args.sequence_parallel,
        bf16=args.bf16,
        fp16=args.fp16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        include_final_loss=not args.tune_exit,
    )
    try:
        return config_from_checkpoint(info, **overrides)
    except ValueError as error:
        arguments.build_parser().error(f"--use-checkpoint-args: {error}")


def _apply_checkpoint_args(args, info) -> None:
    """``--use-checkpoint-args``: model shape, exits and tokenizer come from the checkpoint;
    the parallel layout, precision and training flags stay as given."""
    record, model = info.model_config, info.model
    for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                 "num_query_groups", "normalization", "hidden_dropout", "attention_dropout",
                 "init_method_std"):  # fmt: skip
        setattr(args, name, record[name])
    args.group_query_attention = record["num_query_groups"] is not None
    args.swiglu = record["gated_linear_unit"]
    args.disable_bias_linear = not record["add_bias_linear"]
    args.untie_embeddings_and_output_weights = record["untie_embeddings_and_output_weights"]
    args.position_embedding_type = model["position_embedding_type"]
    args.rotary_base = model.get("rotary_base") or args.rotary_base
    args.seq_length = info.model_args.get("seq_length", args.seq_length)
    _apply_checkpoint_exits(args, record)
    tokenizer = info.model_args.get("tokenizer")
    if tokenizer and args.tokenizer_type is None:
        for name, value in tokenizer.items():
            setattr(args, name, value)


def _apply_checkpoint_exits(args, record: dict) -> None:
    heads = record["exit_heads"]
    if not heads:
        return
    args.exit_layer_nums = [h["layer_number"] for h in heads]
    args.pre_exit = heads[0]["pre_exit"]
    args.untie_exit_output_weights = heads[0]["untied"]
    structure = heads[0]["structure"]
    args.use_exit_norm = structure != "head"
    args.use_exit_mlp, args.use_exit_block = structure == "mlp", structure == "block"
    args.exit_layer_weight = [h["loss_weight"] for h in heads]
    args.exit_layer_weight_init = [h["loss_weight_init"] for h in heads]
    args.exit_layer_temperature = [h["temperature"] for h in heads]
    if len({(h["pre_exit"], h["structure"], h["untied"]) for h in heads}) > 1:
        raise SystemExit(
            "--use-checkpoint-args: the checkpoint's exits mix placements/structures, which the "
            "command-line flags cannot express; build the model with config_from_checkpoint"
        )


def _config_or_exit(args, vocab_size: int):
    try:
        return arguments.model_config(args, vocab_size)
    except ValueError as error:
        arguments.build_parser().error(str(error))


def _num_fill(config, settings) -> int:
    if settings.fill is None:
        return 0
    schedule = build_fill_schedule(
        config.pipeline_model_parallel_size,
        settings.num_microbatches,
        stages_with_exits(config),
        settings.fill,
    )
    return schedule.num_effective_warmup
