"""EE-LLM's legacy checkpoints (the Megatron-LM ``megatron/model`` stack it forked) -> ours.

The legacy layout, one ``torch.save`` file per (tensor, pipeline) rank::

    <dir>/latest_checkpointed_iteration.txt         "2400" (or "release")
    <dir>/iter_0002400/mp_rank_TT/model_optim_rng.pt          PP = 1
    <dir>/iter_0002400/mp_rank_TT_PPP/model_optim_rng.pt      PP > 1

Each file is a dict with ``args`` (the run's ``argparse.Namespace``), ``iteration``,
``checkpoint_version`` and ``model``, the stage's nested state dict. Flattened with dots, its keys
are (``i``: the layer index *within the stage*, ``j``: the exit index within the stage, in the
order of ``args.exit_layer_nums``)::

    language_model.embedding.word_embeddings.weight            stage 0, vocab-parallel
    language_model.embedding.position_embeddings.weight        stage 0, learned_absolute only
    language_model.encoder.layers.i.input_norm.{weight,bias}   (older: input_layernorm)
    language_model.encoder.layers.i.self_attention.query_key_value.{weight,bias}
    language_model.encoder.layers.i.self_attention.dense.{weight,bias}
    language_model.encoder.layers.i.post_attention_norm.*      (older: post_attention_layernorm)
    language_model.encoder.layers.i.mlp.dense_h_to_4h.*        (mlp exits: mlp.trunk, mlp.branch)
    language_model.encoder.layers.i.mlp.dense_4h_to_h.*
    language_model.encoder.layers.i.exit_norm.*                --use-exit-norm
    language_model.encoder.layers.i.exit_block.<a layer's keys> --use-exit-block
    language_model.encoder.final_norm.*                        last stage (older: final_layernorm)
    language_model.output_layer.weight                         last stage, untied embeddings
    language_model.exit_output_layer.j.weight                  --untie-exit-output-weights
    word_embeddings_for_head.weight                            stages > 0 using the tied embedding

Biases exist only with ``add_bias_linear`` and LayerNorm. The fused QKV rows of a TP rank are its
query groups, each ``[its query heads, key, value]``: concatenated over ranks that is
megatron-core's ``linear_qkv`` layout. With SwiGLU each rank's ``dense_h_to_4h`` is ``[gate
rows; up rows]`` of its own slice, so the full ``linear_fc1`` is ``[all gates; all ups]``.

:func:`legacy_to_megatron` reads the run's ``args`` into our config (refusing, with every
reason at once, what it cannot map), merges the TP shards and stages into one state dict of our
model at TP=1/PP=1 and saves it with :func:`~megatron.early_exit.checkpoint.store.
save_checkpoint`; that checkpoint loads at any TP/PP.

EE-LLM's ``--use-exit-mlp`` exit is a second MLP (``branch``) inside the exit layer L, fed by the
layer's attention output: the exit reads ``r + branch(post_attention_norm(r))`` where ``r`` is
the layer's residual after attention. Our ``mlp`` exit reads a layer boundary, so it cannot
express that; the same function is our ``block`` exit on the *input* of layer L (a pre-exit)
whose transformer layer is layer L's input norm and attention with the branch MLP. That is what
the importer writes (the attention weights are copied, so a later tuning run trains the copy,
not the backbone's attention).
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from megatron.early_exit.checkpoint.convert import ConversionError, target_layout_problems
from megatron.early_exit.checkpoint.hf import load_megatron_state_dict
from megatron.early_exit.checkpoint.loading import LOCAL_SPEC, build_model
from megatron.early_exit.checkpoint.store import save_checkpoint
from megatron.early_exit.config import EarlyExitTransformerConfig, ExitHeadConfig

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
MODEL_FILENAME = "model_optim_rng.pt"
_RANK_DIR_RE = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?$")
_SUPPORTED_TOKENIZERS = ("GPT2BPETokenizer", "SentencePieceTokenizer", "HuggingFaceTokenizer")

# Older Megatron names -> the names EE-LLM's snapshot uses (last path segment of a module).
_NORM_ALIASES = {
    "input_layernorm": "input_norm",
    "post_attention_layernorm": "post_attention_norm",
    "final_layernorm": "final_norm",
}

# ---------------------------------------------------------------------------------------------
# Reading the files
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LegacyCheckpoint:
    """One iteration of a legacy checkpoint, every rank's file read."""

    path: Path
    """The iteration directory (``iter_NNNNNNN`` or ``release``)."""
    iteration: int | None
    """None for a ``release`` checkpoint."""
    args: argparse.Namespace
    checkpoint_version: float
    tensor_parallel_size: int
    pipeline_parallel_size: int
    shards: dict[tuple[int, int], dict[str, torch.Tensor]]
    """``{(tp_rank, pp_rank): {flattened key (older norm names renamed): tensor}}``."""
    original_keys: dict[tuple[int, int], dict[str, str]]
    """The keys as the files spell them, for messages."""

    def shard_name(self, tp: int, pp: int) -> str:
        return _rank_dir(tp, pp, self.pipeline_parallel_size) + "/" + MODEL_FILENAME


def _rank_dir(tp: int, pp: int, num_stages: int) -> str:
    return f"mp_rank_{tp:02d}" if num_stages == 1 else f"mp_rank_{tp:02d}_{pp:03d}"


def legacy_iteration_dir(load_dir: str | os.PathLike, iteration: int | None = None) -> Path:
    """The iteration directory to read: ``iter_<iteration>``, or the one the tracker file names
    (``release`` when it says so). ConversionError naming what is missing."""
    root = Path(load_dir)
    if not root.is_dir():
        raise ConversionError(f"legacy checkpoint directory {root} does not exist")
    if iteration is None:
        tracker = root / TRACKER_FILENAME
        if not tracker.is_file():
            raise ConversionError(
                f"{root} has no {TRACKER_FILENAME}; pass the iteration to convert "
                "(--load-iteration N)"
            )
        text = tracker.read_text().strip()
        if text == "release":
            name = "release"
        elif text.isdigit():
            name = f"iter_{int(text):07d}"
        else:
            raise ConversionError(
                f"{tracker}: expected an iteration number or 'release', got {text!r}"
            )
    else:
        name = f"iter_{iteration:07d}"
    path = root / name
    if not path.is_dir():
        present = sorted(p.name for p in root.iterdir() if p.name.startswith(("iter_", "release")))
        raise ConversionError(
            f"iteration directory {path} does not exist (found: {', '.join(present) or 'none'})"
        )
    return path


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _canonical_key(key: str) -> str:
    return ".".join(_NORM_ALIASES.get(part, part) for part in key.split("."))


def _torch_load(path: Path) -> dict:
    # EE-LLM's files are pickles holding an argparse.Namespace (and optimizer/RNG state), so
    # weights_only loading cannot read them: convert only checkpoints you trust. mmap leaves
    # the optimizer tensors on disk.
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            return torch.load(path, map_location="cpu", weights_only=False)
    except (ModuleNotFoundError, AttributeError, pickle.UnpicklingError, RuntimeError) as exc:
        raise ConversionError(f"cannot read {path}: {exc}") from exc


def read_legacy_checkpoint(
    load_dir: str | os.PathLike, iteration: int | None = None
) -> LegacyCheckpoint:
    """Read every ``mp_rank_*/model_optim_rng.pt`` of one iteration (see the module docstring).

    Raises ConversionError for a missing directory or file, a rank grid with holes, files
    without ``args``/``model`` or that disagree on the iteration, and virtual-pipeline files
    (``model0``, ``model1``, ...).
    """
    path = legacy_iteration_dir(load_dir, iteration)
    ranks = {}
    for child in sorted(path.iterdir()):
        match = _RANK_DIR_RE.match(child.name)
        if match and child.is_dir():
            ranks[(int(match.group(1)), int(match.group(2) or 0))] = child / MODEL_FILENAME
    if not ranks:
        raise ConversionError(f"{path} has no mp_rank_* directories: not a legacy checkpoint")
    first = _torch_load(_require_file(ranks[min(ranks)]))
    problems = _file_problems(first, ranks[min(ranks)])
    if problems:
        _raise(f"legacy checkpoint {path}", problems)
    args = first["args"]
    tp = int(getattr(args, "tensor_model_parallel_size", 1))
    pp = int(getattr(args, "pipeline_model_parallel_size", 1))
    expected = {(t, p) for t in range(tp) for p in range(pp)}
    missing = sorted(expected - set(ranks))
    if missing:
        names = ", ".join(_rank_dir(t, p, pp) for t, p in missing)
        note = ""
        if pp > 1 and all(p > 0 for _, p in missing):
            note = (
                " (an EE-Tuning checkpoint saved with --tune-exit-pipeline-parallel-size holds "
                "only its first stages; convert the full checkpoint it was tuned from)"
            )
        _raise(
            f"legacy checkpoint {path}",
            [f"its args say TP={tp}, PP={pp}, but {names} {'is' if len(missing) == 1 else 'are'} "
             f"missing{note}"],
        )  # fmt: skip
    extra = sorted(set(ranks) - expected)
    if extra:
        names = ", ".join(ranks[r].parent.name for r in extra)
        _raise(f"legacy checkpoint {path}", [f"{names} outside its args' TP={tp}, PP={pp}"])
    shards, originals = {}, {}
    for rank in sorted(expected):
        state = first if rank == min(ranks) else _torch_load(_require_file(ranks[rank]))
        problems += _file_problems(state, ranks[rank])
        if problems:
            continue
        if state.get("iteration") != first.get("iteration"):
            problems.append(
                f"{ranks[rank]}: iteration {state.get('iteration')}, but "
                f"{ranks[min(ranks)]} has {first.get('iteration')}"
            )
        flat = _flatten(state["model"])
        shards[rank] = {_canonical_key(k): v for k, v in flat.items()}
        originals[rank] = {_canonical_key(k): k for k in flat}
        del state
    _raise(f"legacy checkpoint {path}", problems)
    version = first.get("checkpoint_version", 0)
    return LegacyCheckpoint(
        path=path,
        iteration=None if path.name == "release" else first.get("iteration"),
        args=args,
        checkpoint_version=float(version),
        tensor_parallel_size=tp,
        pipeline_parallel_size=pp,
        shards=shards,
        original_keys=originals,
    )


def _require_file(path: Path) -> Path:
    if not path.is_file():
        raise ConversionError(f"{path} does not exist")
    return path


def _file_problems(state, path: Path) -> list[str]:
    if not isinstance(state, Mapping):
        return [f"{path}: expected a dict, got {type(state).__name__}"]
    problems = []
    if not isinstance(state.get("args"), argparse.Namespace):
        problems.append(f"{path}: no 'args' namespace (the training run's arguments)")
    if "model" not in state:
        if any(re.fullmatch(r"model\d+", k) for k in state):
            problems.append(
                f"{path}: virtual-pipeline model chunks (model0, model1, ...) are not supported "
                "(EE-LLM does not train with them)"
            )
        else:
            problems.append(f"{path}: no 'model' state dict")
    elif not isinstance(state["model"], Mapping):
        problems.append(f"{path}: 'model' is a {type(state['model']).__name__}, not a dict")
    return problems


def _raise(what: str, problems: list[str]) -> None:
    if problems:
        raise ConversionError(
            f"{what}: {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems)
        )


# ---------------------------------------------------------------------------------------------
# args -> our config
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LegacyModel:
    """What the legacy ``args`` say about the network, in our terms."""

    config_kwargs: dict
    """Fields of :class:`EarlyExitTransformerConfig` (exit heads included)."""
    model_kwargs: dict
    """``vocab_size``, ``max_sequence_length``, ``position_embedding_type``, ``rotary_base``."""
    exit_layers: tuple[int, ...]
    """EE-LLM's ``exit_layer_nums`` in their order (the order of ``exit_output_layer.j``)."""
    legacy_structure: str
    """``head``, ``norm``, ``mlp`` (EE-LLM's branch MLP) or ``block``."""
    swiglu: bool
    tokenizer: dict | None
    seq_length: int | None


_MISSING = object()


def _get(args, name: str, default=_MISSING):
    value = getattr(args, name, _MISSING)
    if value is _MISSING:
        if default is _MISSING:
            raise KeyError(name)
        return default
    return value


def _unsupported_arg_problems(args, version: float) -> list[str]:
    problems = []
    if version < 2.0:
        problems.append(
            f"checkpoint_version {version} stores query/key/value in an older order (Megatron "
            "converts < 2.0 on load); load and save it once with Megatron-LM first"
        )
    rules = (
        ("transformer_impl", lambda v: v not in (None, "local"),
         "only the 'local' layer implementation has the legacy key names"),
        ("num_experts", lambda v: v is not None, "mixture-of-experts layers are not supported"),
        ("virtual_pipeline_model_parallel_size", lambda v: v is not None,
         "virtual pipeline chunks are not supported"),
        ("retro_add_retriever", bool, "Retro is not supported"),
        ("standalone_embedding_stage", bool, "a standalone embedding stage is not supported"),
        ("rotary_percent", lambda v: v is not None and v != 1.0,
         "partial rotary embeddings are not supported"),
        ("rotary_seq_len_interpolation_factor", lambda v: v is not None,
         "rotary position interpolation is not supported"),
        ("position_embedding_type", lambda v: v not in (None, "learned_absolute", "rope"),
         "only learned_absolute and rope position embeddings are supported"),
        ("expert_model_parallel_size", lambda v: v not in (None, 1),
         "expert parallelism is not supported"),
        ("apply_layernorm_1p", bool,
         "zero-centred-gamma norms are not supported by the local layer spec the tools build"),
    )  # fmt: skip
    for name, bad, why in rules:
        value = getattr(args, name, None)
        if bad(value):
            problems.append(f"args.{name}={value!r}: {why}")
    if getattr(args, "num_tokentypes", 0):
        problems.append(f"args.num_tokentypes={args.num_tokentypes}: token types are not supported")
    return problems


def _activation(args) -> tuple[Any, bool]:
    """(activation function, gated)."""
    from megatron.core.activations import squared_relu
    from megatron.core.transformer.utils import openai_gelu

    if _get(args, "swiglu", False):
        return F.silu, True
    if _get(args, "openai_gelu", False):
        return openai_gelu, False
    if _get(args, "squared_relu", False):
        return squared_relu, False
    return F.gelu, False  # also onnx_safe's erf_gelu, which is the exact GeLU


def _exit_problems(args, num_layers: int, num_stages: int) -> tuple[list[str], str]:
    layers = list(_get(args, "exit_layer_nums", None) or [])
    norm, mlp, block = (bool(_get(args, f"use_exit_{s}", False)) for s in ("norm", "mlp", "block"))
    problems = []
    if mlp and block:
        problems.append("args.use_exit_mlp and args.use_exit_block together (EE-LLM refuses it)")
    if (mlp or block) and not norm:
        problems.append(
            f"args.use_exit_{'mlp' if mlp else 'block'} without use_exit_norm: our mlp/block "
            "exits end in a norm"
        )
    if mlp and _get(args, "pre_exit", False):
        problems.append("args.use_exit_mlp with pre_exit (EE-LLM refuses it)")
    bad = [n for n in layers if not isinstance(n, int) or not 1 <= n <= num_layers]
    if bad:
        problems.append(f"args.exit_layer_nums {bad} out of range 1..{num_layers}")
    if len(set(layers)) != len(layers):
        problems.append(f"args.exit_layer_nums {layers} repeats a layer")
    for name in ("exit_layer_weight", "exit_layer_weight_init", "exit_layer_temperature"):
        values = _get(args, name, None)
        if values is not None and layers and len(values) != len(layers):
            problems.append(
                f"args.{name} has {len(values)} values for {len(layers)} exits {layers}"
            )
    structure = "block" if block else "mlp" if mlp else "norm" if norm else "head"
    if num_stages and num_layers % num_stages:
        problems.append(
            f"args.num_layers={num_layers} is not divisible by PP={num_stages} (EE-LLM splits "
            "layers uniformly)"
        )
    return problems, structure


def _exit_heads(args, structure: str, untied: bool) -> tuple[ExitHeadConfig, ...]:
    layers = list(_get(args, "exit_layer_nums", None) or [])
    weights = _get(args, "exit_layer_weight", None) or [1.0] * len(layers)
    inits = _get(args, "exit_layer_weight_init", None) or [0.0] * len(layers)
    temperatures = _get(args, "exit_layer_temperature", None) or [1.0] * len(layers)
    # EE-LLM's branch-MLP exit on layer L is our block exit on layer L's input (module docstring).
    pre_exit = bool(_get(args, "pre_exit", False)) or structure == "mlp"
    ours = "block" if structure == "mlp" else structure
    return tuple(
        ExitHeadConfig(
            layer_number=int(layer),
            pre_exit=pre_exit,
            structure=ours,
            loss_weight=float(weights[i]),
            loss_weight_init=float(inits[i]),
            temperature=float(temperatures[i]),
            untied=untied,
        )  # fmt: skip
        for i, layer in enumerate(layers)
    )


def _tokenizer(args) -> dict | None:
    kind = _get(args, "tokenizer_type", None)
    if kind not in _SUPPORTED_TOKENIZERS:
        return None
    return {
        "tokenizer_type": kind,
        "tokenizer_model": _get(args, "tokenizer_model", None),
        "vocab_file": _get(args, "vocab_file", None),
        "merge_file": _get(args, "merge_file", None),
        "vocab_size": None,
    }


def legacy_model(args: argparse.Namespace, checkpoint_version: float = 3.0) -> LegacyModel:
    """Our config for the legacy run's ``args``; ConversionError listing everything that has no
    equivalent (Transformer Engine layers, MoE, partial RoPE, mlp + block exits, ...)."""
    problems = _unsupported_arg_problems(args, checkpoint_version)
    try:
        num_layers = int(_get(args, "num_layers"))
        hidden = int(_get(args, "hidden_size"))
        heads = int(_get(args, "num_attention_heads"))
        vocab = int(_get(args, "padded_vocab_size"))
        positions = int(_get(args, "max_position_embeddings"))
    except KeyError as exc:
        _raise("legacy checkpoint args", problems + [f"args has no {exc.args[0]}"])
    num_stages = int(_get(args, "pipeline_model_parallel_size", 1))
    exit_problems, structure = _exit_problems(args, num_layers, num_stages)
    problems += exit_problems
    _raise("legacy checkpoint args cannot be mapped", problems)
    activation, gated = _activation(args)
    untied_model = bool(_get(args, "untie_embeddings_and_output_weights", False))
    untied_exits = bool(_get(args, "untie_exit_output_weights", False))
    if not untied_exits and untied_model:
        _raise(
            "legacy checkpoint args cannot be mapped",
            ["tied exits (no untie_exit_output_weights) with untied embeddings: EE-LLM cannot "
             "build that model either"],
        )  # fmt: skip
    groups = None
    if _get(args, "group_query_attention", False):
        groups = _get(args, "num_query_groups", None)
    warmup_style = _get(args, "exit_layer_weight_warmup_style", None) or "linear"
    config = dict(
        num_layers=num_layers,
        hidden_size=hidden,
        ffn_hidden_size=int(_get(args, "ffn_hidden_size", None) or 4 * hidden),
        num_attention_heads=heads,
        num_query_groups=groups,
        kv_channels=_get(args, "kv_channels", None) or hidden // heads,
        normalization=_get(args, "normalization", "LayerNorm"),
        layernorm_epsilon=float(_get(args, "norm_epsilon", _get(args, "layernorm_epsilon", 1e-5))),
        add_bias_linear=bool(_get(args, "add_bias_linear", True)),
        gated_linear_unit=gated,
        activation_func=activation,
        apply_residual_connection_post_layernorm=bool(
            _get(args, "apply_residual_connection_post_layernorm", False)
        ),
        init_method_std=float(_get(args, "init_method_std", 0.02)),
        hidden_dropout=float(_get(args, "hidden_dropout", 0.1)),
        attention_dropout=float(_get(args, "attention_dropout", 0.1)),
        untie_embeddings_and_output_weights=untied_model,
        exit_heads=_exit_heads(args, structure, untied_exits),
        exit_loss_weight_warmup_iters=int(_get(args, "exit_layer_weight_warmup_iters", 0) or 0),
        exit_loss_weight_warmup_style=warmup_style,
        dynamic_exit_loss_weight=bool(_get(args, "use_dynamic_exit_layer_weight", False)),
    )  # fmt: skip
    if activation is not F.gelu:
        config["bias_activation_fusion"] = False
    position = _get(args, "position_embedding_type", None) or "learned_absolute"
    model = dict(
        vocab_size=vocab,
        max_sequence_length=positions,
        position_embedding_type=position,
        rotary_base=_get(args, "rotary_base", 10000) if position == "rope" else None,
    )
    return LegacyModel(
        config_kwargs=config, model_kwargs=model,
        exit_layers=tuple(int(n) for n in _get(args, "exit_layer_nums", None) or ()),
        legacy_structure=structure, swiglu=gated, tokenizer=_tokenizer(args),
        seq_length=_get(args, "seq_length", None),
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Key map: legacy tensors -> ours
# ---------------------------------------------------------------------------------------------

# How TP shards combine: "rows"/"cols" concatenate along dim 0/1, "replicated" is one copy,
# "gated_rows" is SwiGLU's fc1 ([gate; up] per shard -> [all gates; all ups]).
_LAYER_MAP = (
    ("input_norm.weight", "input_layernorm.weight", "replicated"),
    ("input_norm.bias", "input_layernorm.bias", "replicated"),
    ("self_attention.query_key_value.weight", "self_attention.linear_qkv.weight", "rows"),
    ("self_attention.query_key_value.bias", "self_attention.linear_qkv.bias", "rows"),
    ("self_attention.dense.weight", "self_attention.linear_proj.weight", "cols"),
    ("self_attention.dense.bias", "self_attention.linear_proj.bias", "replicated"),
    ("post_attention_norm.weight", "pre_mlp_layernorm.weight", "replicated"),
    ("post_attention_norm.bias", "pre_mlp_layernorm.bias", "replicated"),
)
_MLP_MAP = (
    ("dense_h_to_4h.weight", "linear_fc1.weight", "fc1"),
    ("dense_h_to_4h.bias", "linear_fc1.bias", "fc1"),
    ("dense_4h_to_h.weight", "linear_fc2.weight", "cols"),
    ("dense_4h_to_h.bias", "linear_fc2.bias", "replicated"),
)
_NORM_MAP = (("weight", "weight"), ("bias", "bias"))


@dataclass(frozen=True)
class _Entry:
    legacy: str  # flattened legacy key (EE-LLM's norm names)
    ours: str
    merge: str
    stage: int


def _has(name: str, has_bias: bool, has_norm_bias: bool) -> bool:
    if name.endswith("norm.bias"):
        return has_norm_bias
    if name.endswith(".bias"):
        return has_bias
    return True


def _layer_entries(legacy: str, ours: str, stage: int, mlp: str, flags) -> list[_Entry]:
    """A transformer layer's tensors; ``mlp`` is the legacy MLP's path inside the layer."""
    has_bias, has_norm_bias = flags
    out = [
        _Entry(legacy + lk, ours + ok, merge, stage)
        for lk, ok, merge in _LAYER_MAP
        if _has(lk, has_bias, has_norm_bias)
    ]
    out += [
        _Entry(f"{legacy}{mlp}.{lk}", f"{ours}mlp.{ok}", merge, stage)
        for lk, ok, merge in _MLP_MAP
        if _has(lk, has_bias, has_norm_bias)
    ]
    return out


def legacy_key_map(model: LegacyModel, num_stages: int) -> list[_Entry]:
    """Every tensor a legacy checkpoint of ``model`` split over ``num_stages`` holds, where it
    lives and the key of ours it becomes (TP merge rule included). ``word_embeddings_for_head``
    copies are not listed: they duplicate the embedding (see :func:`legacy_to_state_dict`)."""
    c = model.config_kwargs
    flags = (c["add_bias_linear"], c["normalization"] == "LayerNorm")
    per_stage = c["num_layers"] // num_stages
    exits = {e.layer_number: e for e in c["exit_heads"]}
    enc = "language_model.encoder."
    entries = [_Entry("language_model.embedding.word_embeddings.weight",
                      "embedding.word_embeddings.weight", "rows", 0)]  # fmt: skip
    if model.model_kwargs["position_embedding_type"] == "learned_absolute":
        entries.append(_Entry("language_model.embedding.position_embeddings.weight",
                              "embedding.position_embeddings.weight", "replicated", 0))  # fmt: skip
    for index in range(c["num_layers"]):
        stage, local = divmod(index, per_stage)
        layer_number = index + 1
        legacy = f"{enc}layers.{local}."
        head = exits.get(layer_number)
        branch = head is not None and model.legacy_structure == "mlp"
        entries += _layer_entries(
            legacy, f"decoder.layers.{index}.", stage, "mlp.trunk" if branch else "mlp", flags
        )
        if head is None:
            continue
        prefix = f"exit_heads.{head.depth}."
        if model.legacy_structure in ("norm", "mlp", "block"):
            entries += [
                _Entry(f"{legacy}exit_norm.{lk}", f"{prefix}norm.{ok}", "replicated", stage)
                for lk, ok in _NORM_MAP
                if _has(f"norm.{lk}", *flags)
            ]
        if model.legacy_structure == "block":
            block = f"{legacy}exit_block."
            entries += _layer_entries(block, f"{prefix}layer.", stage, "mlp", flags)
        if branch:  # layer L's attention (shared in EE-LLM) + the branch MLP
            entries += [
                _Entry(legacy + lk, f"{prefix}layer.{ok}", merge, stage)
                for lk, ok, merge in _LAYER_MAP
                if _has(lk, *flags)
            ]
            entries += [
                _Entry(f"{legacy}mlp.branch.{lk}", f"{prefix}layer.mlp.{ok}", merge, stage)
                for lk, ok, merge in _MLP_MAP
                if _has(lk, *flags)
            ]
    entries += [
        _Entry(f"{enc}final_norm.{lk}", f"decoder.final_layernorm.{ok}", "replicated",
               num_stages - 1)
        for lk, ok in _NORM_MAP
        if _has(f"norm.{lk}", *flags)
    ]  # fmt: skip
    if c["untie_embeddings_and_output_weights"]:
        entries.append(_Entry("language_model.output_layer.weight", "output_layer.weight",
                              "rows", num_stages - 1))  # fmt: skip
    untied = [n for n in model.exit_layers if exits[n].untied]
    for stage in range(num_stages):
        local = [n for n in untied if (n - 1) // per_stage == stage]
        for j, layer_number in enumerate(local):
            entries.append(
                _Entry(f"language_model.exit_output_layer.{j}.weight",
                       f"exit_heads.{exits[layer_number].depth}.output_layer.weight", "rows",
                       stage)
            )  # fmt: skip
    return entries


def _shard_shapes(model: LegacyModel, tp: int) -> dict[str, tuple[int, ...]]:
    """Per-TP-shard shape of each of our tensors' legacy counterpart, by our key's suffix."""
    c, m = model.config_kwargs, model.model_kwargs
    h, heads = c["hidden_size"], c["num_attention_heads"]
    groups, d = c["num_query_groups"] or heads, c["kv_channels"]
    f = c["ffn_hidden_size"] * (2 if model.swiglu else 1)
    return {
        "word_embeddings.weight": (m["vocab_size"] // tp, h),
        "output_layer.weight": (m["vocab_size"] // tp, h),
        "position_embeddings.weight": (m["max_sequence_length"], h),
        "linear_qkv.weight": ((heads + 2 * groups) * d // tp, h),
        "linear_qkv.bias": ((heads + 2 * groups) * d // tp,),
        "linear_proj.weight": (h, heads * d // tp),
        "linear_fc1.weight": (f // tp, h),
        "linear_fc1.bias": (f // tp,),
        "linear_fc2.weight": (h, c["ffn_hidden_size"] // tp),
        "norm.weight": (h,), "norm.bias": (h,), "layernorm.weight": (h,), "layernorm.bias": (h,),
        "linear_proj.bias": (h,), "linear_fc2.bias": (h,),
    }  # fmt: skip


def _expected_shape(ours: str, shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, ...]:
    for suffix, shape in shapes.items():
        if ours.endswith(suffix):
            return shape
    raise AssertionError(f"no shape rule for {ours}")


def _merge(tensors: list[torch.Tensor], rule: str) -> torch.Tensor:
    if rule == "replicated":
        return tensors[0]
    if rule == "rows":
        return torch.cat(tensors, dim=0)
    if rule == "cols":
        return torch.cat(tensors, dim=1)
    assert rule == "gated_rows", rule
    halves = [t.chunk(2, dim=0) for t in tensors]  # per shard: [gate; up]
    return torch.cat([g for g, _ in halves] + [u for _, u in halves], dim=0)


_HEAD_COPY = "word_embeddings_for_head.weight"


def _shard_problems(ckpt: LegacyCheckpoint, model: LegacyModel, entries) -> list[str]:
    """Missing, unexpected, non-tensor and wrong-shape entries of every file."""
    shapes = _shard_shapes(model, ckpt.tensor_parallel_size)
    tied = not model.config_kwargs["untie_embeddings_and_output_weights"]
    problems = []
    for (t, p), shard in sorted(ckpt.shards.items()):
        wanted = {e.legacy: _expected_shape(e.ours, shapes) for e in entries if e.stage == p}
        if tied and p > 0:  # the tied embedding's copy: optional, checked against stage 0
            wanted.setdefault(_HEAD_COPY, shapes["word_embeddings.weight"])
        name = ckpt.shard_name(t, p)
        for key, shape in wanted.items():
            value = shard.get(key)
            if value is None:
                if key != _HEAD_COPY:
                    problems.append(
                        f"{name}: missing {_spellings(key)} (expected shape {list(shape)})"
                    )
            elif not isinstance(value, torch.Tensor):
                problems.append(f"{name}: {key} is a {type(value).__name__}, not a tensor")
            elif tuple(value.shape) != shape:
                problems.append(
                    f"{name}: {ckpt.original_keys[(t, p)][key]} has shape "
                    f"{list(value.shape)}, expected {list(shape)}"
                )
        problems += [
            f"{name}: unexpected key {ckpt.original_keys[(t, p)][key]}"
            for key in shard
            if key not in wanted
        ]
    return problems


def _spellings(key: str) -> str:
    """``key`` and, when it has one, its older Megatron spelling."""
    older = {new: old for old, new in _NORM_ALIASES.items()}
    parts = key.split(".")
    renamed = ".".join(older.get(part, part) for part in parts)
    return key if renamed == key else f"{key} (older Megatron: {renamed})"


def legacy_to_state_dict(ckpt: LegacyCheckpoint, model: LegacyModel) -> dict[str, torch.Tensor]:
    """Our model's full (TP=1, PP=1) state dict from the shards of ``ckpt``.

    Checks first and raises one ConversionError listing every missing, unexpected and
    wrong-shape tensor (by file), replicated tensors that differ between TP ranks, and
    ``word_embeddings_for_head`` copies that differ from the embedding.
    """
    tp, pp = ckpt.tensor_parallel_size, ckpt.pipeline_parallel_size
    entries = legacy_key_map(model, pp)
    _raise(f"legacy checkpoint {ckpt.path}", _shard_problems(ckpt, model, entries))
    problems = []
    out: dict[str, torch.Tensor] = {}
    for entry in entries:
        tensors = [ckpt.shards[(t, entry.stage)][entry.legacy] for t in range(tp)]
        rule = entry.merge
        if rule == "fc1":
            rule = "gated_rows" if model.swiglu else "rows"
        if rule == "replicated":
            problems += [
                f"{entry.legacy} differs between {ckpt.shard_name(0, entry.stage)} and "
                f"{ckpt.shard_name(t, entry.stage)} (it should be replicated)"
                for t in range(1, tp)
                if not torch.equal(tensors[t], tensors[0])
            ]
        out[entry.ours] = _merge(tensors, rule)  # loading into the model copies
    embedding = out["embedding.word_embeddings.weight"]
    for p in range(1, pp):
        copies = [ckpt.shards[(t, p)].get(_HEAD_COPY) for t in range(tp)]
        if all(c is not None for c in copies) and not torch.equal(torch.cat(copies), embedding):
            problems.append(
                f"{ckpt.shard_name(0, p)}: {_HEAD_COPY} differs from the word embedding of "
                "stage 0; our format keeps one tied embedding, so converting would lose one copy"
            )
    _raise(f"legacy checkpoint {ckpt.path}", problems)
    return out


# ---------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------


def legacy_to_model(
    load_dir: str | os.PathLike,
    *,
    iteration: int | None = None,
    target_tensor_parallel_size: int = 1,
    target_pipeline_parallel_size: int = 1,
    seed: int = 1234,
):
    """``(ckpt, legacy_model, config, model)``: the legacy checkpoint in ``load_dir`` as our
    TP=1/PP=1 model in float32, eval mode. Needs an initialised single-process platform."""
    from megatron.early_exit import platform

    ckpt = read_legacy_checkpoint(load_dir, iteration)
    described = legacy_model(ckpt.args, ckpt.checkpoint_version)
    _raise(
        f"converting {ckpt.path}",
        target_layout_problems(
            described.config_kwargs, described.model_kwargs, target_tensor_parallel_size,
            target_pipeline_parallel_size,
        ),
    )  # fmt: skip
    state = legacy_to_state_dict(ckpt, described)
    fields = {**described.config_kwargs, **platform.config_overrides(), **LOCAL_SPEC}
    if "bias_activation_fusion" in described.config_kwargs:
        fields["bias_activation_fusion"] = described.config_kwargs["bias_activation_fusion"]
    try:
        config = EarlyExitTransformerConfig(**fields)
    except ValueError as exc:
        raise ConversionError(f"converting {ckpt.path}: {exc}") from exc
    model = build_model(config, described.model_kwargs, seed=seed)
    dtype = config.params_dtype
    load_megatron_state_dict(model, {k: v.to(dtype) for k, v in state.items()})
    model.eval()
    return ckpt, described, config, model


def legacy_to_megatron(
    load_dir: str | os.PathLike,
    save_dir: str | os.PathLike,
    *,
    iteration: int | None = None,
    target_tensor_parallel_size: int = 1,
    target_pipeline_parallel_size: int = 1,
    seed: int = 1234,
) -> Path:
    """Convert one iteration of EE-LLM's legacy checkpoint in ``load_dir`` (the tracker's, or
    ``iteration``) into our checkpoint in ``save_dir`` (iteration 0, float32, no optimizer
    state). Returns the published checkpoint directory.

    ``model_args`` record the tokenizer the legacy args name (when we build that kind),
    ``seq_length`` and ``legacy_conversion`` (source directory, iteration, layout, the target
    layout). The target sizes are only validated: the checkpoint loads at any TP/PP.
    """
    ckpt, described, _, model = legacy_to_model(
        load_dir, iteration=iteration, target_tensor_parallel_size=target_tensor_parallel_size,
        target_pipeline_parallel_size=target_pipeline_parallel_size, seed=seed,
    )  # fmt: skip
    args = ckpt.args
    model_args = {
        "tokenizer": described.tokenizer,
        "seq_length": described.seq_length or described.model_kwargs["max_sequence_length"],
        "legacy_conversion": {
            "source": str(ckpt.path.resolve()),
            "iteration": ckpt.iteration,
            "checkpoint_version": ckpt.checkpoint_version,
            "tensor_parallel_size": ckpt.tensor_parallel_size,
            "pipeline_parallel_size": ckpt.pipeline_parallel_size,
            "exit_structure": described.legacy_structure,
            "tokenizer_type": _get(args, "tokenizer_type", None),
            "consumed_train_samples": _get(args, "consumed_train_samples", None),
            "target_tensor_parallel_size": target_tensor_parallel_size,
            "target_pipeline_parallel_size": target_pipeline_parallel_size,
        },
    }
    return save_checkpoint(save_dir, model, iteration=0, model_args=model_args)


__all__ = [
    "LegacyCheckpoint",
    "LegacyModel",
    "legacy_iteration_dir",
    "legacy_key_map",
    "legacy_model",
    "legacy_to_megatron",
    "legacy_to_model",
    "legacy_to_state_dict",
    "read_legacy_checkpoint",
]
