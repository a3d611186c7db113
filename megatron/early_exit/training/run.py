"""What ``pretrain_early_exit_gpt.py`` runs: flags -> configs -> data, model, trainer -> loop.

The loop reads top to bottom: each iteration takes its microbatches (and bubble-fill
microbatches) from the data position, runs one optimizer step through the early-exit pipeline
schedule, logs, evaluates and saves at their intervals.

EE-Tuning on part of the model (``--tune-exit --tune-exit-pipeline-parallel-size K``) builds
only the layers up to the deepest exit, over K pipeline stages; see :func:`partial_num_layers`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from megatron.core import parallel_state

from megatron.early_exit import platform
from megatron.early_exit.checkpoint.record import CheckpointError, config_from_checkpoint
from megatron.early_exit.checkpoint.sharded import PartialBackbone
from megatron.early_exit.checkpoint.store import TRACKER_FILENAME, read_checkpoint_info, sweep_stale
from megatron.early_exit.config import EarlyExitTransformerConfig
from megatron.early_exit.data.datasets import build_gpt_datasets
from megatron.early_exit.data.default_corpus import default_training_data
from megatron.early_exit.data.tokenizers import build_tokenizer
from megatron.early_exit.model.builder import build_early_exit_model
from megatron.early_exit.model.gpt_model import EarlyExitGPTModel
from megatron.early_exit.pipeline.bubble_fill import build_fill_schedule
from megatron.early_exit.placement import stages_with_exits, tied_exit_stages
from megatron.early_exit.training import arguments
from megatron.early_exit.training.batches import causal_mask
from megatron.early_exit.training.logging import RunLogger
from megatron.early_exit.training.loop import Trainer, evaluate, setup_trainer, train_step

logger = logging.getLogger(__name__)


@dataclass
class DataSource:
    """Deterministic microbatches by position in the training samples: an iteration takes the
    next :attr:`samples_per_iteration` samples after :attr:`consumed_samples`, data-parallel
    rank r the r-th slice of them. The position is the count of samples consumed, as Megatron's
    ``consumed_train_samples``, so a resume with another data-parallel size or global batch
    continues where the saved run stopped."""

    train: object
    valid: object | None
    micro_batch_size: int
    num_microbatches: int
    num_fill: int
    data_parallel_rank: int
    data_parallel_size: int
    consumed_samples: int = 0

    @property
    def samples_per_iteration(self) -> int:
        per_replica = self.micro_batch_size * (self.num_microbatches + self.num_fill)
        return per_replica * self.data_parallel_size

    def next_iteration(self) -> tuple[list[dict], list[dict]]:
        """The real and fill microbatches of the next iteration on this data-parallel rank;
        advances :attr:`consumed_samples` by one iteration's samples (all ranks')."""
        per_replica = self.micro_batch_size * (self.num_microbatches + self.num_fill)
        start = self.consumed_samples + self.data_parallel_rank * per_replica
        batches = [
            self._batch(self.train, start + i * self.micro_batch_size)
            for i in range(self.num_microbatches + self.num_fill)
        ]
        self.consumed_samples += self.samples_per_iteration
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


def padded_vocab_size(vocab_size: int, tensor_model_parallel_size: int, divisor: int = 128) -> int:
    """Megatron-LM's padding: a multiple of ``--make-vocab-size-divisible-by`` x TP."""
    multiple = divisor * tensor_model_parallel_size
    return -(-vocab_size // multiple) * multiple


def build_tokenizer_from_args(args, recorded: dict | None = None) -> tuple[object, dict]:
    """The tokenizer and its description for checkpoints: the flags', else ``recorded`` (a
    checkpoint's, under ``--use-checkpoint-args``), else the bundled corpus's. Without
    ``--data-path`` and ``--mock-data`` the run trains on the bundled corpus, whose tokenizer it
    must use."""
    info = _tokenizer_description(args, recorded)
    if not args.mock_data and args.data_path is None:
        default = default_training_data()
        if info is None:
            info = _description("SentencePieceTokenizer", tokenizer_model=default.tokenizer_model)
        if (info["tokenizer_type"], info["tokenizer_model"]) != (
            "SentencePieceTokenizer",
            default.tokenizer_model,
        ):
            arguments.build_parser().error(
                f"--data-path is required with --tokenizer-type {info['tokenizer_type']} (the "
                f"default corpus is tokenized with {default.tokenizer_model})"
            )
        args.data_path = [default.data_prefix]
    if info is None:
        kind = "NullTokenizer" if args.mock_data else "GPT2BPETokenizer"
        vocab_size = args.vocab_size
        if args.mock_data and vocab_size is None and kind == "NullTokenizer":
            vocab_size = 1024
        info = _description(
            kind, args.vocab_file, args.merge_file, args.tokenizer_model, vocab_size
        )
    kwargs = {k: v for k, v in info.items() if k != "tokenizer_type" and v is not None}
    return build_tokenizer(info["tokenizer_type"], **kwargs), info


def _tokenizer_description(args, recorded: dict | None) -> dict | None:
    if args.tokenizer_type is not None:
        return _description(args.tokenizer_type, args.vocab_file, args.merge_file,
                            args.tokenizer_model, args.vocab_size)  # fmt: skip
    if recorded:
        fields = ("vocab_file", "merge_file", "tokenizer_model", "vocab_size")
        return _description(recorded["tokenizer_type"], *(recorded.get(f) for f in fields))
    return None


def _description(tokenizer_type, vocab_file=None, merge_file=None, tokenizer_model=None,
                 vocab_size=None) -> dict:  # fmt: skip
    return {
        "tokenizer_type": tokenizer_type,
        "vocab_file": vocab_file,
        "merge_file": merge_file,
        "tokenizer_model": tokenizer_model,
        "vocab_size": vocab_size,
    }


def build_data(
    args, tokenizer, settings, num_fill: int, seq_length: int, resume=(0, 0)
) -> DataSource:
    """The run's data, positioned at ``resume = (iteration, consumed samples)``."""
    dp_size = parallel_state.get_data_parallel_world_size()
    per_iteration = settings.micro_batch_size * (settings.num_microbatches + num_fill) * dp_size
    eval_samples = args.eval_iters * settings.micro_batch_size
    iteration, consumed = resume
    num_train = max(args.train_iters * per_iteration,
                    consumed + max(args.train_iters - iteration, 0) * per_iteration)  # fmt: skip
    datasets = build_gpt_datasets(
        tokenizer,
        seq_length=seq_length,
        seed=args.seed,
        num_samples=(num_train, eval_samples, 0),
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
        consumed_samples=consumed,
    )


def main(argv: list[str] | None = None) -> dict:
    """Train; returns the final evaluation (``lm_loss`` and every ``exit_<depth>``)."""
    args = arguments.parse_args(argv)
    try:
        arguments.check_platform_flags(args)
    except ValueError as error:
        arguments.build_parser().error(str(error))
    _checkpoint_or_fresh_start(args)
    if args.query_key_layer_scaling:  # Transformer Engine reads it here, as Megatron-LM sets it
        os.environ["NVTE_APPLY_QK_LAYER_SCALING"] = "1"
    if args.tune_exit_pipeline_parallel_size is not None:
        # The original's P, the checkpoint's stages; this run has K (see partial_num_layers),
        # built from the complete model's config at one stage.
        args.pipeline_model_parallel_size = 1
    info = read_checkpoint_info(args.load) if args.use_checkpoint_args else None
    recorded = info.model_args.get("tokenizer") if info is not None else None
    tokenizer, tokenizer_info = build_tokenizer_from_args(args, recorded)
    if info is None:
        vocab_size = padded_vocab_size(
            tokenizer.vocab_size, args.tensor_model_parallel_size,
            args.make_vocab_size_divisible_by,
        )  # fmt: skip
        shape = _shape_from_flags(args, _config_or_exit(args, vocab_size), vocab_size)
    else:  # the checkpoint's model (activation, exits, vocab) in this run's layout
        shape = _shape_from_checkpoint(args, info)
    partial = None
    if args.tune_exit_pipeline_parallel_size is not None:
        shape, partial = _partial_backbone(args, shape)
    config = shape.config
    platform.initialize(
        args.tensor_model_parallel_size,
        config.pipeline_model_parallel_size,
        seed=args.seed,
        embedding_stages=tied_exit_stages(config),
        timeout_s=args.distributed_timeout_minutes * 60.0,
    )
    if args.save and torch.distributed.get_rank() == 0:
        sweep_stale(args.save)  # what a crashed save of an earlier run left there
    settings = arguments.run_settings(args, parallel_state.get_data_parallel_world_size())
    num_fill = _num_fill(config, settings)
    data = build_data(args, tokenizer, settings, num_fill, shape.seq_length, _resume_position(args))
    model = _build_model(shape, partial)
    trainer = setup_trainer(
        model,
        arguments.training_config(args),
        mode=settings.mode,
        fill=settings.fill,
        defer_exits=settings.defer_exits,
        distributed_optimizer=settings.use_distributed_optimizer,
    )
    if args.load:
        _load(args, trainer, partial)
    logger = RunLogger(
        args, config, tokens_per_iteration=data.samples_per_iteration * shape.seq_length
    )
    model_args = {"tokenizer": tokenizer_info, "seq_length": shape.seq_length}
    result = _train_loop(args, trainer, data, logger, model_args, partial)
    logger.close()
    platform.destroy()
    return result


def _resume_position(args) -> tuple[int, int]:
    """``(iteration, consumed samples)`` a ``--load`` continues from: the checkpoint's saved
    ``consumed_samples`` (not iteration x this run's global batch, which differs when the
    data-parallel size or the global batch changed); ``(0, 0)`` for a fresh start or
    ``--finetune``."""
    if not args.load or args.finetune:
        return 0, 0
    try:
        info = read_checkpoint_info(args.load)
    except CheckpointError as error:
        arguments.build_parser().error(f"--load {args.load}: {error}")
    consumed = (info.data_state or {}).get("consumed_samples")
    if consumed is None and info.iteration == 0:  # a conversion tool's checkpoint
        consumed = 0
    if consumed is None:
        arguments.build_parser().error(
            f"--load {args.load}: the checkpoint (iteration {info.iteration}) records no "
            "consumed_samples, so the data position to resume from is unknown; start from its "
            "weights with --finetune"
        )
    return info.iteration, int(consumed)


def _load(args, trainer: Trainer, partial) -> None:
    try:
        trainer.load_checkpoint(args.load, finetune=args.finetune, partial=partial)
    except CheckpointError as error:
        arguments.build_parser().error(f"--load {args.load}: {error}")


def _checkpoint_or_fresh_start(args) -> None:
    """Megatron's ``--load`` of a directory without a checkpoint (no tracker file yet, e.g. the
    first job of a requeued series): start fresh with a warning. Flags that only make sense
    with a checkpoint stop with an error instead."""
    if not args.load or (Path(args.load) / TRACKER_FILENAME).is_file():
        return
    needs = [flag for flag, on in (
        ("--use-checkpoint-args", args.use_checkpoint_args), ("--finetune", args.finetune),
        ("--tune-exit-pipeline-parallel-size", args.tune_exit_pipeline_parallel_size),
    ) if on]  # fmt: skip
    if needs:
        arguments.build_parser().error(
            f"--load {args.load}: no checkpoint there ({TRACKER_FILENAME} missing), which "
            f"{', '.join(needs)} need"
        )
    logger.warning(
        "--load %s: no checkpoint there (%s missing); training starts from scratch",
        args.load, TRACKER_FILENAME,
    )  # fmt: skip
    args.load = None


@dataclass(frozen=True)
class ModelShape:
    """The model a run builds: from the flags, or from ``--use-checkpoint-args``' checkpoint
    record with this run's layout, precision and objective flags applied once."""

    config: EarlyExitTransformerConfig
    vocab_size: int
    max_sequence_length: int
    position_embedding_type: str
    rotary_base: int
    seq_length: int
    """Training sequence length (the checkpoint's recorded one under --use-checkpoint-args)."""


def _shape_from_flags(args, config, vocab_size: int) -> ModelShape:
    return ModelShape(
        config=config,
        vocab_size=vocab_size,
        max_sequence_length=args.max_position_embeddings or args.seq_length,
        position_embedding_type=args.position_embedding_type,
        rotary_base=args.rotary_base,
        seq_length=args.seq_length,
    )


def _train_loop(args, trainer: Trainer, data: DataSource, logger, model_args, partial) -> dict:
    logger.start(trainer.iteration)
    while trainer.iteration < args.train_iters:
        start = time.perf_counter()
        microbatches, fills = data.next_iteration()
        metrics = train_step(trainer, microbatches, fills)
        logger.iteration(metrics, time.perf_counter() - start)
        if data.valid is not None and trainer.iteration % args.eval_interval == 0:
            logger.evaluation(
                trainer.iteration, evaluate(trainer, data.validation(args.eval_iters))
            )
        if args.save and args.save_interval and trainer.iteration % args.save_interval == 0:
            _save(args, trainer, data, model_args, partial)
        if args.exit_interval and trainer.iteration % args.exit_interval == 0:
            break  # Megatron's --exit-interval: the final save below makes it resumable
    final = evaluate(trainer, data.validation(args.eval_iters)) if data.valid is not None else {}
    logger.final(trainer.iteration, final)
    if args.save:
        _save(args, trainer, data, model_args, partial)
    return final


def _save(args, trainer, data: DataSource, model_args: dict, partial) -> None:
    trainer.save_checkpoint(
        args.save,
        data_state={"consumed_samples": data.consumed_samples},
        model_args=model_args,
        partial=partial,
    )


# --------------------------------------------------------------------------------------------
# EE-Tuning on part of the model (--tune-exit-pipeline-parallel-size)
# --------------------------------------------------------------------------------------------


def partial_num_layers(config, num_stages: int) -> int:
    """How many layers an EE-Tuning run over ``num_stages`` pipeline stages builds
    (``--tune-exit-pipeline-parallel-size K``); ValueError when K does not fit the exits.

    The design, and how it differs from the original EE-LLM's:

    * EE-Tuning freezes the backbone and trains the exits on their own losses. Nothing after
      the deepest exit is trained or needed, so the run builds the layers up to the deepest
      exit's layer and no final norm or output layer. The layers are split evenly over the K
      stages, which are the whole pipeline of the run: world size = TP x K x DP. Each process
      reads only its layers from the checkpoint (:class:`PartialBackbone`).
    * The layer count is rounded up to a multiple of K, but never beyond the model's layers.
      The forward still stops after the deepest exit, so a rounded-up layer is read and never
      run. The last stage must hold the deepest exit's layer: a stage after it would idle.
    * The original EE-LLM builds the first K of the checkpoint's P uniform stages, with P given
      as ``--pipeline-model-parallel-size``, because its checkpoints are files per stage. Ours
      are dist_checkpointing checkpoints that any layout reads, so P plays no part:
      ``--pipeline-model-parallel-size`` is accepted for the original's scripts and ignored
      (``main`` builds the complete model's config at one stage, the run's at K).
    * Every save is a complete checkpoint: the untouched layers and final head are copied from
      the loaded checkpoint, so the tuned checkpoint serves generation as it is.
    """
    if config.exits_use_final_logits:
        raise ValueError(
            "the exits learn from the final head's logits (--exit-kl-weight, "
            "--exit-confidence-head), which a model cut after the deepest exit does not have; "
            "EE-Tune with the full model"
        )
    if not config.exit_heads:
        raise ValueError("EE-Tuning needs exits (--exit-layer-nums or a checkpoint with exits)")
    deepest = max(e.layer_number for e in config.exit_heads)
    valid = [k for k in range(1, deepest + 1) if _fits(k, deepest, config.num_layers)]
    if not _fits(num_stages, deepest, config.num_layers):
        raise ValueError(
            f"the {deepest} layers up to the deepest exit cannot be split over {num_stages} "
            f"stages with the last stage holding layer {deepest} (each stage holds "
            f"ceil({deepest}/K) layers of the {config.num_layers}); valid values: "
            + ", ".join(map(str, valid))
        )
    return -(-deepest // num_stages) * num_stages


def _fits(num_stages: int, deepest: int, num_layers: int) -> bool:
    per_stage = -(-deepest // num_stages)
    return per_stage * num_stages <= num_layers and per_stage * (num_stages - 1) < deepest


def _partial_backbone(args, shape: ModelShape):
    """This run's model (the first layers, over K stages) and the full model's record."""
    config = shape.config
    stages = args.tune_exit_pipeline_parallel_size
    flag = f"--tune-exit-pipeline-parallel-size {stages}"
    parser = arguments.build_parser()
    try:
        num_layers = partial_num_layers(config, stages)
        source = read_checkpoint_info(args.load).path
    except ValueError as error:
        parser.error(f"{flag}: {error}")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size % (args.tensor_model_parallel_size * stages):
        parser.error(
            f"{flag}: the world size {world_size} is not a multiple of "
            f"--tensor-model-parallel-size x {stages} stages"
        )
    model_config = dataclasses.replace(
        config, num_layers=num_layers, pipeline_model_parallel_size=stages
    )
    return dataclasses.replace(shape, config=model_config), PartialBackbone(config, source)


class _PartialBackboneModel(EarlyExitGPTModel):
    """The first layers of an early-exit model, with no final norm and no output layer.

    megatron-core's embedding group always holds the last pipeline stage, for an output layer
    tied to the word embedding. This model has none, so its stages take part in the group only
    for exits tied to the word embedding, whose copies stay in sync over it as on any stage.
    Without tied exits no stage takes part; otherwise the first stage would wait at model
    construction for a last stage that holds no copy of the embedding.
    """

    def _is_in_embd_group(self) -> bool:
        tied_exits = any(not e.untied for e in self.config.exit_heads)
        return tied_exits and super()._is_in_embd_group()


def _build_model(shape: ModelShape, partial) -> EarlyExitGPTModel:
    kwargs = dict(
        vocab_size=shape.vocab_size,
        max_sequence_length=shape.max_sequence_length,
        position_embedding_type=shape.position_embedding_type,
        rotary_base=shape.rotary_base,
    )
    if partial is None:
        return build_early_exit_model(shape.config, **kwargs)
    model = _PartialBackboneModel(
        shape.config,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=False,
        **kwargs,
    )
    return model.to(platform.device())


def _shape_from_checkpoint(args, info) -> ModelShape:
    """``--use-checkpoint-args``: the checkpoint's model with this run's layout, precision and
    training objective.

    From the checkpoint: the model shape (every field of ``record.MODEL_CONFIG_FIELDS``; the
    shape flags are not read), the exits' positions and structures (``--exit-layer-nums`` and
    the structure flags are not read), vocab size, position embeddings, training sequence
    length and tokenizer (unless ``--tokenizer-type`` is given).
    From the command line: layout (TP/PP/SP), precision, recomputation and attention kernel,
    ``--tune-exit``, distillation and confidence-head flags, and each exit-objective flag of
    ``arguments.EXIT_OBJECTIVE_FLAGS`` that is given (``--exit-layer-weight``,
    ``--exit-layer-weight-init``, ``--exit-layer-temperature``, the weight warm-up flags,
    ``--use-dynamic-exit-layer-weight``); one left out keeps the checkpoint's value.
    """
    model = info.model
    return ModelShape(
        config=_checkpoint_config(args, info),
        vocab_size=model["vocab_size"],
        max_sequence_length=model["max_sequence_length"],
        position_embedding_type=model["position_embedding_type"],
        rotary_base=model.get("rotary_base") or args.rotary_base,
        seq_length=info.model_args.get("seq_length", args.seq_length),
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
        # The training objective is this run's: distillation and confidence heads as flagged.
        # A checkpoint's own confidence heads are kept (their width is the checkpoint's unless
        # --exit-confidence-hidden-size says otherwise).
        exit_kl_weight=args.exit_kl_weight,
    )
    if args.exit_confidence_loss_weight is not None:
        overrides["exit_confidence_loss_weight"] = args.exit_confidence_loss_weight
    overrides.update(arguments.runtime_config_fields(args))
    try:
        heads = tuple(
            dataclasses.replace(e, confidence_hidden_size=_confidence_width(args, e))
            for e in config_from_checkpoint(info).exit_heads
        )
        overrides.update(arguments.exit_objective_from_flags(args, heads))
        config = config_from_checkpoint(info, **overrides)
        config.check_trainable_final_head_targets()
        return config
    except ValueError as error:
        arguments.build_parser().error(f"--use-checkpoint-args: {error}")


def _confidence_width(args, exit_head) -> int:
    if not args.exit_confidence_head:
        return exit_head.confidence_hidden_size  # the checkpoint's (0: none)
    saved = exit_head.confidence_hidden_size
    return args.exit_confidence_hidden_size or saved or arguments.confidence_hidden_size(args)


def _config_or_exit(args, vocab_size: int):
    try:
        config = arguments.model_config(args, vocab_size)
        config.check_trainable_final_head_targets()
        return config
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
