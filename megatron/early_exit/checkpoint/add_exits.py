"""Add early exits to a model or a saved checkpoint, initialised from the model's own modules.

Copy initialisation (the default) gives every new exit the weights of the backbone module it
mirrors, so a new exit starts out as a sensible head rather than noise:

============================  ==========================================================
new exit tensor               copied from
============================  ==========================================================
``norm.*``                    ``decoder.final_layernorm.*`` (the final norm)
``output_layer.weight``       ``output_layer.weight``, or the word embedding when the model
                              ties embeddings and output weights (untied exits only)
``mlp.*`` / ``mlp_norm.*``    the exit layer's own ``mlp.*`` / ``pre_mlp_layernorm.*``
                              (``decoder.layers.<layer_number - 1>``)
``layer.*``                   the last transformer layer (``decoder.layers.<num_layers - 1>``)
============================  ==========================================================

With ``zero_mlp_output`` (``--exit-mlp-zero-init``) the output projection of a new ``mlp``
exit's residual MLP (``mlp.linear_fc2.*``) starts at zero, so the exit starts exactly as the
final norm and head applied to its layer's output (the "logit lens") and the MLP grows from
there as an adapter. The copy alone adds the layer's MLP output a second time.

With ``temperature`` T (``--exit-temperature-init``) a new exit's last norm (``norm.weight``
and ``norm.bias``, the last thing before the projection) is scaled by 1/T, so the exit starts
with its logits divided by T exactly. The logit lens of a pretrained model is overconfident at
intermediate layers: on SmolLM2-135M (held-out Brown text) it has a cross entropy of 20-23 at
layers 8-22 (worse than uniform, 10.8) and of 7.3-8.2 at T=4; with Adam at lr 1e-3 a norm weight
of magnitude ~2 moves ~1e-3 per step, so tuning from T=1 spends its first hundreds of steps on
calibration. ``tools/eval_exits.py`` prints each exit's best temperature.

With ``random_init`` the new exits keep the fresh model's initialisation
(:func:`~megatron.early_exit.model.builder.reproducible_init_`: weights ~ N(0,
``init_method_std``), norms 1, biases 0). Exits the model already has are never replaced unless
``overwrite`` is set. Everything here works on full (TP=1, PP=1) state dicts in one process;
the saved checkpoint loads at any TP/PP (dist_checkpointing reshards).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch

from megatron.early_exit.checkpoint.hf import (
    EXIT_PREFIX,
    EXTRA_STATE_SUFFIX,
    load_megatron_state_dict,
)
from megatron.early_exit.checkpoint.loading import LOCAL_SPEC, build_model, load_model
from megatron.early_exit.checkpoint.record import checkpoint_config
from megatron.early_exit.checkpoint.store import save_checkpoint
from megatron.early_exit.config import EarlyExitTransformerConfig, ExitHeadConfig, make_exit_heads


def new_exit_heads(
    layer_numbers: Sequence[int],
    *,
    structure: str = "head",
    pre_exit: bool = False,
    untied: bool = False,
    model_untied: bool = False,
) -> tuple[ExitHeadConfig, ...]:
    """Exit records for ``layer_numbers``; exits of a model with untied embeddings are untied
    (the config requires it)."""
    return make_exit_heads(
        list(layer_numbers), pre_exit=pre_exit, structure=structure, untied=untied or model_untied
    )


def merge_exit_heads(
    existing: Iterable[ExitHeadConfig],
    new: Iterable[ExitHeadConfig],
    *,
    overwrite: bool = False,
) -> tuple[tuple[ExitHeadConfig, ...], set[int]]:
    """``(all exits sorted by depth, depths to initialise)``. Raises ValueError listing every
    new exit whose depth the model already has an exit at (unless ``overwrite``) and every depth
    given twice."""
    by_depth = {e.depth: e for e in existing}
    problems, fresh = [], set()
    for head in new:
        if head.depth in fresh:
            problems.append(f"depth {head.depth} given twice (layer {head.layer_number})")
        elif head.depth in by_depth and not overwrite:
            problems.append(
                f"an exit at depth {head.depth} already exists ({_describe(by_depth[head.depth])});"
                " pass overwrite=True (--overwrite-exits) to replace it"
            )
        by_depth[head.depth] = head
        fresh.add(head.depth)
    if problems:
        raise ValueError(
            f"adding exits: {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems)
        )
    return tuple(sorted(by_depth.values(), key=lambda e: e.depth)), fresh


def _describe(head: ExitHeadConfig) -> str:
    where = "input" if head.pre_exit else "output"
    tie = "untied" if head.untied else "tied"
    return f"{head.structure} exit on the {where} of layer {head.layer_number}, {tie}"


ZERO_INIT_PREFIX = "mlp.linear_fc2."
"""Tensors of an ``mlp`` exit that ``zero_mlp_output`` starts at zero (relative to the exit)."""
TEMPERATURE_PREFIX = "norm."
"""Tensors of an exit that ``temperature`` scales by 1/T (relative to the exit)."""


def copy_source(name: str, head: ExitHeadConfig, config: EarlyExitTransformerConfig) -> str:
    """The backbone tensor a new exit's tensor ``name`` (relative to the exit) is copied from."""
    if name == "output_layer.weight":
        if config.untie_embeddings_and_output_weights:
            return "output_layer.weight"
        return "embedding.word_embeddings.weight"
    if name.startswith("norm."):
        return "decoder.final_layernorm." + name.removeprefix("norm.")
    if name.startswith("mlp_norm."):
        layer = f"decoder.layers.{head.layer_number - 1}."
        return layer + "pre_mlp_layernorm." + name.removeprefix("mlp_norm.")
    if name.startswith("mlp."):
        return f"decoder.layers.{head.layer_number - 1}." + name
    if name.startswith("layer."):
        return f"decoder.layers.{config.num_layers - 1}." + name.removeprefix("layer.")
    raise ValueError(f"no backbone module to copy exit tensor {name!r} from")


def initial_exit_state(
    fresh: Mapping[str, torch.Tensor],
    source: Mapping[str, torch.Tensor],
    config: EarlyExitTransformerConfig,
    depths: Iterable[int],
    *,
    random_init: bool = False,
    zero_mlp_output: bool = False,
    temperature: float = 1.0,
) -> dict[str, torch.Tensor]:
    """The tensors of the exits at ``depths`` (full keys ``exit_heads.<depth>.*``).

    ``fresh`` is the new model's own state dict (it names the tensors each exit has and holds
    their random initialisation); ``source`` holds the backbone tensors to copy. Raises
    ValueError listing every tensor that cannot be copied (missing, or of another shape), and
    for a ``temperature`` that is not positive or an exit without a norm to carry it.
    """
    out, problems = {}, []
    if not temperature > 0:
        raise ValueError(f"exit temperature must be > 0, got {temperature}")
    for depth in sorted(depths):
        head = config.exit_head(depth)
        if temperature != 1.0 and head.structure == "head":
            problems.append(
                f"exit at depth {depth} has no norm to scale for temperature {temperature} "
                "(--exit-temperature-init needs --use-exit-norm)"
            )
        prefix = f"{EXIT_PREFIX}{depth}."
        for key, value in fresh.items():
            if not key.startswith(prefix) or key.endswith(EXTRA_STATE_SUFFIX):
                continue
            if random_init:
                out[key] = value.detach().clone()
                continue
            src = copy_source(key.removeprefix(prefix), head, config)
            if src not in source:
                problems.append(f"{key}: no {src} to copy from")
            elif tuple(source[src].shape) != tuple(value.shape):
                problems.append(
                    f"{key}: shape {list(value.shape)}, but {src} is {list(source[src].shape)}"
                )
            else:
                out[key] = source[src].detach().clone().to(value.dtype)
    if zero_mlp_output:
        for key in out:
            if key.split(".", 2)[2].startswith(ZERO_INIT_PREFIX):
                out[key] = torch.zeros_like(out[key])
    if temperature != 1.0:
        for key in out:
            if key.split(".", 2)[2].startswith(TEMPERATURE_PREFIX):
                out[key] = out[key] / temperature
    if problems:
        raise ValueError(
            f"initialising exits: {len(problems)} problem(s):\n"
            + "\n".join(f"  - {p}" for p in problems)
        )
    return out


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def add_exits_to_model(
    model,
    model_facts: Mapping,
    make_config: Callable[..., EarlyExitTransformerConfig],
    new: Sequence[ExitHeadConfig],
    *,
    overwrite: bool = False,
    random_init: bool = False,
    zero_mlp_output: bool = False,
    temperature: float = 1.0,
    init_method_std: float | None = None,
    seed: int = 1234,
):
    """``(new config, new model)``: ``model`` with the exits ``new`` added (see the module
    docstring for their initialisation); backbone and kept exits are copied exactly.

    ``make_config(**overrides)`` builds the model's config with ``exit_heads`` (and
    ``init_method_std``) replaced; ``model_facts`` are ``vocab_size``, ``max_sequence_length``,
    ``position_embedding_type`` and ``rotary_base``.
    """
    exits, depths = merge_exit_heads(model.config.exit_heads, new, overwrite=overwrite)
    overrides = {"exit_heads": exits}
    if init_method_std is not None:
        overrides["init_method_std"] = init_method_std
    new_config = make_config(**overrides)
    new_model = build_model(new_config, model_facts, seed=seed)
    fresh = new_model.state_dict()
    old = model.state_dict()
    state = {
        k: v
        for k, v in old.items()
        if not k.endswith(EXTRA_STATE_SUFFIX) and _exit_depth(k) not in depths
    }
    state.update(
        initial_exit_state(
            fresh, old, new_config, depths,
            random_init=random_init, zero_mlp_output=zero_mlp_output, temperature=temperature,
        )
    )  # fmt: skip
    load_megatron_state_dict(new_model, state)
    new_model.eval()
    return new_config, new_model


def _exit_depth(key: str) -> int | None:
    if not key.startswith(EXIT_PREFIX):
        return None
    return int(key[len(EXIT_PREFIX) :].split(".", 1)[0])


def add_exits_to_checkpoint(
    load_dir: str | os.PathLike,
    save_dir: str | os.PathLike,
    new: Sequence[ExitHeadConfig] | None = None,
    *,
    layer_numbers: Sequence[int] = (),
    structure: str = "head",
    pre_exit: bool = False,
    untied: bool = False,
    overwrite: bool = False,
    random_init: bool = False,
    zero_mlp_output: bool = False,
    temperature: float = 1.0,
    init_method_std: float | None = None,
    seed: int = 1234,
):
    """Load ``load_dir``, add exits (``new`` records, or built from ``layer_numbers`` and the
    structure flags), save to ``save_dir`` at iteration 0 with the same ``model_args`` and no
    optimizer state. Returns the published checkpoint directory. Needs an initialised
    single-process platform."""
    info, config, model = load_model(load_dir, seed=seed)
    if new is None:
        new = new_exit_heads(
            layer_numbers,
            structure=structure,
            pre_exit=pre_exit,
            untied=untied,
            model_untied=config.untie_embeddings_and_output_weights,
        )
    if not new:
        raise ValueError("adding exits: no exits given (--exit-layer-nums)")
    _, new_model = add_exits_to_model(
        model, info.model, lambda **o: checkpoint_config(info, **LOCAL_SPEC, **o), new,
        overwrite=overwrite, random_init=random_init, zero_mlp_output=zero_mlp_output,
        temperature=temperature, init_method_std=init_method_std, seed=seed,
    )  # fmt: skip
    return save_checkpoint(save_dir, new_model, iteration=0, model_args=info.model_args)


__all__ = [
    "add_exits_to_checkpoint",
    "add_exits_to_model",
    "copy_source",
    "initial_exit_state",
    "merge_exit_heads",
    "new_exit_heads",
]
