"""Hugging Face directories <-> EE-LLM checkpoints (what ``tools/checkpoint/*.py`` call).

* :func:`hf_to_megatron`: an HF ``LlamaForCausalLM`` / ``GPT2LMHeadModel`` directory -> an
  EE-LLM checkpoint (dist_checkpointing, ``<dir>/iter_0000000``), optionally with exits put back
  from ``early_exits.json`` and/or new ones added (:mod:`.add_exits`); tokenizer files are copied
  into ``<save_dir>/tokenizer/`` and recorded in ``model_args``.
* :func:`megatron_to_hf`: an EE-LLM checkpoint (any TP/PP layout) -> an HF directory
  (``config.json``, ``model.safetensors``, the tokenizer files) plus the exit heads beside it as
  ``early_exits.safetensors`` + ``early_exits.json``.

Both run in one process at TP=1/PP=1 (``platform.initialize(1, 1)`` first). The checkpoint
written is TP=1/PP=1, which any layout loads (dist_checkpointing reshards on load); the target
layout is only validated and recorded in ``model_args["hf_conversion"]``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from megatron.early_exit.checkpoint.add_exits import add_exits_to_model
from megatron.early_exit.checkpoint.hf import (
    SUPPORTED_ARCHITECTURES,
    config_from_hf,
    hf_to_megatron_state_dict,
    load_megatron_state_dict,
    megatron_to_hf_state_dict,
)
from megatron.early_exit.checkpoint.loading import LOCAL_SPEC, build_model, load_model
from megatron.early_exit.checkpoint.record import DTYPES
from megatron.early_exit.checkpoint.store import save_checkpoint
from megatron.early_exit.config import EarlyExitTransformerConfig, ExitHeadConfig
from megatron.early_exit.exit_flags import (
    add_exit_structure_flags,
    exit_structure,
    structure_flag_problems,
)
from megatron.early_exit.launch import free_port

EXITS_JSON = "early_exits.json"
EXITS_SAFETENSORS = "early_exits.safetensors"
EXITS_FORMAT_VERSION = 1
TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "chat_template.jinja",
)  # fmt: skip
_WEIGHT_FILES = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)  # fmt: skip
_HF_CLASSES = {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}


class ConversionError(ValueError):
    """Inputs that cannot be converted; the message lists every problem found."""


def _raise(what: str, problems: Sequence[str]) -> None:
    if problems:
        raise ConversionError(
            f"{what}: {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems)
        )


# ---------------------------------------------------------------------------------------------
# Hugging Face side: config, weights, tokenizer, exit files
# ---------------------------------------------------------------------------------------------


def read_hf_config(load_dir: str | os.PathLike):
    """The transformers config of ``load_dir`` (Llama or GPT-2 only; ConversionError else)."""
    import transformers

    root = Path(load_dir)
    path = root / "config.json"
    if not path.is_file():
        _raise(f"Hugging Face directory {root}", [f"no config.json in {root}"])
    model_type = json.loads(path.read_text()).get("model_type")
    if model_type not in _HF_CLASSES:
        _raise(
            f"Hugging Face directory {root}",
            [
                f"unsupported architecture: model_type={model_type!r}; supported: "
                f"{', '.join(SUPPORTED_ARCHITECTURES)} (LlamaForCausalLM, GPT2LMHeadModel)"
            ],
        )
    cls = transformers.LlamaConfig if model_type == "llama" else transformers.GPT2Config
    return cls.from_pretrained(str(root))


def read_hf_state_dict(load_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of an HF checkpoint directory (safetensors or ``pytorch_model.bin``, single
    file or sharded with an index), as saved (dtype unchanged)."""
    from safetensors.torch import load_file

    root = Path(load_dir)
    for index_name, loader in (
        ("model.safetensors.index.json", load_file),
        ("pytorch_model.bin.index.json", _load_bin),
    ):
        index = root / index_name
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            out: dict[str, torch.Tensor] = {}
            for name in files:
                out.update(loader(str(root / name)))
            return out
    if (root / "model.safetensors").is_file():
        return load_file(str(root / "model.safetensors"))
    if (root / "pytorch_model.bin").is_file():
        return _load_bin(str(root / "pytorch_model.bin"))
    raise ConversionError(f"no weights in {root} (looked for {', '.join(_WEIGHT_FILES)})")


def _load_bin(path: str) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy the tokenizer files :data:`TOKENIZER_FILES` ``src`` has into ``dst``; their names."""
    src, dst = Path(src), Path(dst)
    names = [n for n in TOKENIZER_FILES if (src / n).is_file()]
    if names:
        dst.mkdir(parents=True, exist_ok=True)
        for name in names:
            shutil.copy2(src / name, dst / name)
    return names


def save_exit_heads(
    directory: str | os.PathLike,
    exit_heads: Sequence[ExitHeadConfig],
    tensors: Mapping[int, Mapping[str, torch.Tensor]],
) -> None:
    """Write ``early_exits.safetensors`` (keys ``exit_heads.<depth>.<name>``, our TP=1 layout)
    and ``early_exits.json`` (one record per exit: its :class:`ExitHeadConfig` fields, depth and
    tensor names). Nothing is written when there are no exits."""
    from safetensors.torch import save_file

    if not exit_heads:
        return
    root = Path(directory)
    records, flat = [], {}
    for head in exit_heads:
        names = sorted(tensors.get(head.depth, {}))
        records.append({"depth": head.depth, **dataclasses.asdict(head), "tensors": names})
        for name in names:
            flat[f"exit_heads.{head.depth}.{name}"] = _standalone(tensors[head.depth][name])
    save_file(flat, str(root / EXITS_SAFETENSORS), metadata={"format": "pt"})
    record = {
        "format_version": EXITS_FORMAT_VERSION,
        "layout": "EE-LLM (megatron-core local spec) tensor names and layout at TP=1",
        "safetensors": EXITS_SAFETENSORS,
        "exits": records,
    }
    (root / EXITS_JSON).write_text(json.dumps(record, indent=2) + "\n")


def load_exit_heads(
    directory: str | os.PathLike,
) -> tuple[tuple[ExitHeadConfig, ...], dict[int, dict[str, torch.Tensor]]]:
    """``(exit records, {depth: {name: tensor}})`` from ``early_exits.json`` (+ safetensors) in
    ``directory``; ``((), {})`` when there is no ``early_exits.json``."""
    from safetensors.torch import load_file

    root = Path(directory)
    path = root / EXITS_JSON
    if not path.is_file():
        return (), {}
    record = json.loads(path.read_text())
    problems = []
    if record.get("format_version") != EXITS_FORMAT_VERSION:
        problems.append(
            f"{path}: format_version {record.get('format_version')!r}, expected "
            f"{EXITS_FORMAT_VERSION}"
        )
    weights = root / record.get("safetensors", EXITS_SAFETENSORS)
    flat = load_file(str(weights)) if weights.is_file() else None
    if flat is None:
        problems.append(f"{weights} is missing")
    fields = {f.name for f in dataclasses.fields(ExitHeadConfig)}
    heads, tensors, used = [], {}, set()
    for entry in record.get("exits", []):
        try:
            head = ExitHeadConfig(**{k: v for k, v in entry.items() if k in fields})
        except (TypeError, ValueError) as exc:
            problems.append(f"{path}: bad exit record {entry!r}: {exc}")
            continue
        if entry.get("depth", head.depth) != head.depth:
            problems.append(f"{path}: exit {entry!r} has depth {entry['depth']}, not {head.depth}")
        heads.append(head)
        for name in entry.get("tensors", []):
            key = f"exit_heads.{head.depth}.{name}"
            used.add(key)
            if flat is not None and key not in flat:
                problems.append(f"{weights}: missing {key}")
            elif flat is not None:
                tensors.setdefault(head.depth, {})[name] = flat[key]
    if flat is not None:
        problems += [f"{weights}: unexpected {k}" for k in sorted(set(flat) - used)]
    _raise(f"exit heads in {root}", problems)
    return tuple(heads), tensors


def _standalone(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor that shares memory with nothing (safetensors refuses shared ones)."""
    return t.detach().contiguous().clone()


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------


def target_layout_problems(
    config_kwargs: Mapping[str, Any],
    model_kwargs: Mapping[str, Any],
    tensor_parallel_size: int,
    pipeline_parallel_size: int,
) -> list[str]:
    """Why a model of these sizes cannot run at TP=``tensor_parallel_size``,
    PP=``pipeline_parallel_size`` (an empty list when it can)."""
    tp, pp = tensor_parallel_size, pipeline_parallel_size
    problems = []
    if not isinstance(tp, int) or tp < 1:
        problems.append(f"target tensor-parallel size must be an integer >= 1, got {tp!r}")
        tp = None
    if not isinstance(pp, int) or pp < 1:
        problems.append(f"target pipeline-parallel size must be an integer >= 1, got {pp!r}")
        pp = None
    heads = config_kwargs["num_attention_heads"]
    groups = config_kwargs.get("num_query_groups") or heads
    sizes = {
        "num_attention_heads": heads,
        "num_query_groups (key/value heads)": groups,
        "ffn_hidden_size": config_kwargs["ffn_hidden_size"],
    }
    if tp:
        for name, size in sizes.items():
            if size % tp:
                problems.append(f"{name}={size} is not divisible by the target TP size {tp}")
        vocab = model_kwargs["vocab_size"]
        if vocab % tp:
            problems.append(
                f"vocab_size={vocab} is not divisible by the target TP size {tp} (the "
                "vocab-parallel embedding and output layer need equal shards; the converter does "
                "not pad the vocabulary, so the HF round trip stays exact)"
            )
    layers = config_kwargs["num_layers"]
    if pp and layers % pp:
        problems.append(f"num_layers={layers} is not divisible by the target PP size {pp}")
    return problems


def hf_config_from_megatron(
    model_config: Mapping[str, Any],
    model_facts: Mapping[str, Any],
    base: Mapping[str, Any] | None = None,
):
    """The transformers config of a checkpoint (the inverse of :func:`config_from_hf`).

    ``model_config`` / ``model_facts`` are :class:`CheckpointInfo`'s ``model_config`` and
    ``model``. ``base`` (an HF ``config.to_dict()``, e.g. the one :func:`hf_to_megatron`
    records) supplies what our config does not hold (token ids, ...); the fields derived from
    ours win. Raises ConversionError listing everything neither Llama nor GPT-2 can express.
    """
    import transformers

    c, m = model_config, model_facts
    heads = c["num_attention_heads"]
    groups = c.get("num_query_groups") or heads
    head_dim = c.get("kv_channels") or c["hidden_size"] // heads
    act = c["activation_func"]
    llama = c["normalization"] == "RMSNorm" and c["gated_linear_unit"]
    problems = []
    if c.get("qk_layernorm"):
        problems.append("qk_layernorm=True")
    if c.get("layernorm_zero_centered_gamma"):
        problems.append("layernorm_zero_centered_gamma=True")
    if c.get("apply_residual_connection_post_layernorm"):
        problems.append("apply_residual_connection_post_layernorm=True")
    if c.get("rotary_interleaved"):
        problems.append("rotary_interleaved=True")
    if llama:
        if act != "silu":
            problems.append(f"activation_func={act!r} with a gated MLP (Llama needs silu)")
        if m["position_embedding_type"] != "rope":
            problems.append(
                f"position_embedding_type={m['position_embedding_type']!r} (Llama: rope)"
            )
        theta = float(m.get("rotary_base") or 10000)
        derived = dict(
            model_type="llama", architectures=["LlamaForCausalLM"],
            vocab_size=m["vocab_size"], hidden_size=c["hidden_size"],
            intermediate_size=c["ffn_hidden_size"], num_hidden_layers=c["num_layers"],
            num_attention_heads=heads, num_key_value_heads=groups, head_dim=head_dim,
            max_position_embeddings=m["max_sequence_length"], rms_norm_eps=c["layernorm_epsilon"],
            tie_word_embeddings=not c["untie_embeddings_and_output_weights"],
            attention_bias=c["add_bias_linear"], mlp_bias=c["add_bias_linear"], hidden_act="silu",
            attention_dropout=c["attention_dropout"],
            rope_parameters={"rope_type": "default", "rope_theta": theta},
        )  # fmt: skip
        cls = transformers.LlamaConfig
    else:
        if c["normalization"] != "LayerNorm" or c["gated_linear_unit"]:
            problems.append(
                f"normalization={c['normalization']!r}, gated_linear_unit="
                f"{c['gated_linear_unit']} (Llama: RMSNorm + gated; GPT-2: LayerNorm, not gated)"
            )
        if act not in ("gelu", "openai_gelu"):
            problems.append(f"activation_func={act!r} (GPT-2: gelu or openai_gelu)")
        if m["position_embedding_type"] != "learned_absolute":
            problems.append(
                f"position_embedding_type={m['position_embedding_type']!r} (GPT-2: "
                "learned_absolute)"
            )
        if not c["add_bias_linear"]:
            problems.append("add_bias_linear=False (GPT-2 has biases)")
        if groups != heads or head_dim * heads != c["hidden_size"]:
            problems.append(
                f"num_query_groups={groups}, kv_channels={head_dim} (GPT-2: no GQA, "
                "head_dim = hidden_size / heads)"
            )
        ffn = c["ffn_hidden_size"]
        derived = dict(
            model_type="gpt2", architectures=["GPT2LMHeadModel"],
            vocab_size=m["vocab_size"], n_embd=c["hidden_size"], n_layer=c["num_layers"],
            n_head=heads, n_inner=None if ffn == 4 * c["hidden_size"] else ffn,
            n_positions=m["max_sequence_length"], layer_norm_epsilon=c["layernorm_epsilon"],
            activation_function="gelu" if act == "gelu" else "gelu_new",
            resid_pdrop=c["hidden_dropout"], embd_pdrop=c["hidden_dropout"],
            attn_pdrop=c["attention_dropout"],
            tie_word_embeddings=not c["untie_embeddings_and_output_weights"],
        )  # fmt: skip
        cls = transformers.GPT2Config
    _raise("this checkpoint has no Hugging Face Llama/GPT-2 equivalent", problems)
    fields = dict(base or {})
    if fields.get("model_type") != derived["model_type"]:
        fields = {}
    for stale in ("transformers_version", "_name_or_path", "rope_theta", "rope_scaling"):
        fields.pop(stale, None)
    fields.update(derived)
    hf_config = cls.from_dict(fields)
    _check_inverse(hf_config, c, m)
    return hf_config


def _check_inverse(hf_config, c: Mapping[str, Any], m: Mapping[str, Any]) -> None:
    """config_from_hf(the derived config) must describe the checkpoint's model."""
    config, model = config_from_hf(hf_config)
    heads = c["num_attention_heads"]
    mismatches = []
    for name, value in config.items():
        if name in c and name not in ("activation_func", "hidden_dropout", "attention_dropout"):
            ours = c[name]
            if name == "num_query_groups":
                ours = ours or heads
            if ours != value and not (name == "kv_channels" and ours is None):
                mismatches.append(f"{name}: checkpoint {ours!r}, HF config gives {value!r}")
    for name, value in model.items():
        if name in m and m[name] is not None and m[name] != value:
            mismatches.append(f"{name}: checkpoint {m[name]!r}, HF config gives {value!r}")
    _raise("derived Hugging Face config does not describe the checkpoint", mismatches)


# ---------------------------------------------------------------------------------------------
# HF -> EE-LLM
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class NewExits:
    """Exits to add while converting (EE-LLM's ``--exit-layer-nums`` family of flags)."""

    layer_numbers: tuple[int, ...] = ()
    structure: str = "head"
    pre_exit: bool = False
    untied: bool = False
    random_init: bool = False
    zero_mlp_output: bool = False
    temperature: float = 1.0
    init_method_std: float | None = None
    overwrite: bool = False


def hf_to_model(
    load_dir: str | os.PathLike,
    *,
    target_tensor_parallel_size: int = 1,
    target_pipeline_parallel_size: int = 1,
    new_exits: NewExits | None = None,
    seed: int = 1234,
):
    """``(hf_config, config, model, model_facts)``: the HF model of ``load_dir`` as our
    TP=1/PP=1 model (exits from ``early_exits.json`` put back, ``new_exits`` added). Validates
    everything first and raises one ConversionError listing every problem."""
    from megatron.early_exit import platform
    from megatron.early_exit.checkpoint.add_exits import merge_exit_heads, new_exit_heads

    root = Path(load_dir)
    hf_config = read_hf_config(root)
    problems = []
    try:
        config_kwargs, model_kwargs = config_from_hf(hf_config)
    except ValueError as exc:
        _raise(f"Hugging Face directory {root}", [str(exc)])
    problems += target_layout_problems(
        config_kwargs, model_kwargs, target_tensor_parallel_size, target_pipeline_parallel_size
    )
    untied_model = config_kwargs["untie_embeddings_and_output_weights"]
    try:
        saved_exits, exit_tensors = load_exit_heads(root)
    except ValueError as exc:
        problems.append(str(exc))
        saved_exits, exit_tensors = (), {}
    new = ()
    spec = new_exits or NewExits()
    if spec.layer_numbers:
        layers = config_kwargs["num_layers"]
        bad = [n for n in spec.layer_numbers if not 1 <= n <= layers]
        if bad:
            problems.append(f"exit layer numbers {bad} out of range 1..{layers}")
        else:
            new = new_exit_heads(
                spec.layer_numbers, structure=spec.structure, pre_exit=spec.pre_exit,
                untied=spec.untied, model_untied=untied_model,
            )  # fmt: skip
            try:
                merge_exit_heads(saved_exits, new, overwrite=spec.overwrite)
            except ValueError as exc:
                problems.append(str(exc))
    try:
        hf_sd = read_hf_state_dict(root)
    except ValueError as exc:
        problems.append(str(exc))
    _raise(f"converting {root}", problems)

    # The local spec whatever the host: the key maps name its modules (see LOCAL_SPEC).
    fields = dict(config_kwargs, **platform.config_overrides(), **LOCAL_SPEC)
    if "bias_activation_fusion" in config_kwargs:  # GPT-2's tanh GELU has no fused kernel
        fields["bias_activation_fusion"] = config_kwargs["bias_activation_fusion"]

    def make_config(**overrides) -> EarlyExitTransformerConfig:
        return EarlyExitTransformerConfig(**{**fields, **overrides})

    config = make_config(exit_heads=saved_exits)
    model = build_model(config, model_kwargs, seed=seed)
    state = hf_to_megatron_state_dict(hf_sd, hf_config, exit_heads=exit_tensors)
    dtype = config.params_dtype
    load_megatron_state_dict(model, {k: v.to(dtype) for k, v in state.items()})
    if new:
        config, model = add_exits_to_model(
            model, model_kwargs, make_config, new, overwrite=spec.overwrite,
            random_init=spec.random_init, zero_mlp_output=spec.zero_mlp_output,
            temperature=spec.temperature, init_method_std=spec.init_method_std, seed=seed,
        )  # fmt: skip
    model.eval()
    return hf_config, config, model, model_kwargs


def hf_to_megatron(
    load_dir: str | os.PathLike,
    save_dir: str | os.PathLike,
    *,
    target_tensor_parallel_size: int = 1,
    target_pipeline_parallel_size: int = 1,
    new_exits: NewExits | None = None,
    seq_length: int | None = None,
    seed: int = 1234,
) -> Path:
    """Convert the HF directory ``load_dir`` into an EE-LLM checkpoint in ``save_dir``
    (iteration 0, no optimizer state). Returns the published checkpoint directory.

    ``model_args`` hold ``tokenizer`` (``HuggingFaceTokenizer`` on ``<save_dir>/tokenizer`` when
    ``load_dir`` has tokenizer files, else None), ``seq_length`` (default: the model's maximum
    positions) and ``hf_conversion`` (the HF config and the target layout).
    """
    hf_config, _, model, model_kwargs = hf_to_model(
        load_dir, target_tensor_parallel_size=target_tensor_parallel_size,
        target_pipeline_parallel_size=target_pipeline_parallel_size, new_exits=new_exits,
        seed=seed,
    )  # fmt: skip
    save_root = Path(save_dir)
    tokenizer_dir = (save_root / TOKENIZER_DIR).resolve()
    tokenizer = None
    if copy_tokenizer_files(load_dir, tokenizer_dir):
        tokenizer = {
            "tokenizer_type": "HuggingFaceTokenizer",
            "tokenizer_model": str(tokenizer_dir),
            "vocab_file": None,
            "merge_file": None,
            "vocab_size": None,
        }
    model_args = {
        "tokenizer": tokenizer,
        "seq_length": seq_length or model_kwargs["max_sequence_length"],
        "hf_conversion": {
            "hf_config": json.loads(hf_config.to_json_string(use_diff=False)),
            "target_tensor_parallel_size": target_tensor_parallel_size,
            "target_pipeline_parallel_size": target_pipeline_parallel_size,
        },
    }
    return save_checkpoint(save_root, model, iteration=0, model_args=model_args)


# ---------------------------------------------------------------------------------------------
# EE-LLM -> HF
# ---------------------------------------------------------------------------------------------


def megatron_to_hf(
    load_dir: str | os.PathLike,
    save_dir: str | os.PathLike,
    *,
    dtype: str | None = None,
    seed: int = 1234,
) -> Path:
    """Convert the newest checkpoint in ``load_dir`` (any TP/PP layout) into an HF directory
    ``save_dir``: ``config.json``, ``model.safetensors`` (``dtype``: keep the checkpoint's when
    None), the tokenizer files ``model_args`` point at, and the exit heads as
    ``early_exits.safetensors`` + ``early_exits.json``. Returns ``save_dir``."""
    from safetensors.torch import save_file

    info, config, model = load_model(load_dir, seed=seed)
    base = (info.model_args.get("hf_conversion") or {}).get("hf_config")
    hf_config = hf_config_from_megatron(info.model_config, info.model, base)
    hf_sd, exits = megatron_to_hf_state_dict(model.state_dict(), hf_config)
    if hf_config.tie_word_embeddings:
        hf_sd.pop("lm_head.weight", None)  # the embedding; HF re-ties it on load
    cast = DTYPES[dtype] if dtype else None
    root = Path(save_dir)
    root.mkdir(parents=True, exist_ok=True)
    weights = {k: _standalone(v if cast is None else v.to(cast)) for k, v in hf_sd.items()}
    save_file(weights, str(root / "model.safetensors"), metadata={"format": "pt"})
    if cast is not None:
        hf_config.dtype = dtype
    hf_config.save_pretrained(str(root))
    tokenizer = info.model_args.get("tokenizer") or {}
    if tokenizer.get("tokenizer_type") == "HuggingFaceTokenizer" and tokenizer.get(
        "tokenizer_model"
    ):
        copy_tokenizer_files(tokenizer["tokenizer_model"], root)
    if cast is not None:
        exits = {d: {n: t.to(cast) for n, t in ts.items()} for d, ts in exits.items()}
    save_exit_heads(root, config.exit_heads, exits)
    return root


@contextlib.contextmanager
def single_process(seed: int = 1234):
    """Initialise this process as a world of one (TP=1, PP=1) for a conversion and tear it
    down afterwards; a free port is chosen unless ``MASTER_PORT`` is set."""
    from megatron.early_exit import platform

    if int(os.environ.get("WORLD_SIZE", "1")) != 1:
        raise ConversionError(
            "checkpoint tools run in one process: do not start them with torchrun"
        )
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())
    platform.initialize(1, 1, seed=seed)
    try:
        yield
    finally:
        platform.destroy()


def add_exit_arguments(parser, *, overwrite: bool = True) -> None:
    """EE-LLM's exit flags plus the initialisation flags of the checkpoint tools."""
    group = parser.add_argument_group("exits")
    add_exit_structure_flags(group)
    add = group.add_argument
    add(
        "--random-init",
        action="store_true",
        help="initialise new exits randomly instead of copying the model's own modules",
    )
    add(
        "--exit-mlp-zero-init",
        action="store_true",
        help="mlp exits: copy the layer's MLP but start its output projection at zero, so the "
        "exit starts as the final norm and head on the layer's output (an adapter init)",
    )
    add(
        "--exit-temperature-init",
        type=float,
        default=1.0,
        metavar="T",
        help="new exits start with their logits divided by T (their last norm scaled by 1/T); "
        "a pretrained model's logit lens is overconfident mid-network (tools/eval_exits.py "
        "prints each exit's best T)",
    )
    add(
        "--init-method-std",
        type=float,
        default=None,
        help="std of random initialisation (default: the model's, 0.02 for HF conversions)",
    )
    if overwrite:
        add("--overwrite-exits", action="store_true", help="replace exits that already exist")


def new_exits_from_args(args) -> NewExits:
    """:class:`NewExits` from :func:`add_exit_arguments`' flags; ConversionError lists misuse."""
    problems = []
    flags = {
        "--random-init": args.random_init, "--init-method-std": args.init_method_std is not None,
        "--exit-mlp-zero-init": args.exit_mlp_zero_init,
        "--exit-temperature-init": args.exit_temperature_init != 1.0,
        "--overwrite-exits": getattr(args, "overwrite_exits", False),
    }  # fmt: skip
    if not args.exit_layer_nums:
        used = [flag for flag, on in flags.items() if on]
        if used:
            problems.append(f"{', '.join(used)} given without --exit-layer-nums")
    problems += structure_flag_problems(args)
    if args.exit_mlp_zero_init and not args.use_exit_mlp:
        problems.append("--exit-mlp-zero-init applies to --use-exit-mlp exits")
    if args.exit_mlp_zero_init and args.random_init:
        problems.append("--exit-mlp-zero-init and --random-init are mutually exclusive")
    if not args.exit_temperature_init > 0:
        problems.append(f"--exit-temperature-init must be > 0, got {args.exit_temperature_init}")
    elif args.exit_temperature_init != 1.0 and not args.use_exit_norm:
        problems.append("--exit-temperature-init scales the exit's norm: it needs --use-exit-norm")
    _raise("exit flags", problems)
    return NewExits(
        layer_numbers=tuple(args.exit_layer_nums),
        structure=exit_structure(args),
        pre_exit=args.pre_exit,
        untied=args.untie_exit_output_weights,
        random_init=args.random_init,
        zero_mlp_output=args.exit_mlp_zero_init,
        temperature=args.exit_temperature_init,
        init_method_std=args.init_method_std,
        overwrite=getattr(args, "overwrite_exits", False),
    )


__all__ = [
    "EXITS_JSON",
    "EXITS_SAFETENSORS",
    "ConversionError",
    "NewExits",
    "copy_tokenizer_files",
    "hf_config_from_megatron",
    "hf_to_megatron",
    "hf_to_model",
    "load_exit_heads",
    "megatron_to_hf",
    "read_hf_config",
    "read_hf_state_dict",
    "save_exit_heads",
    "single_process",
    "add_exit_arguments",
    "new_exits_from_args",
    "target_layout_problems",
]
