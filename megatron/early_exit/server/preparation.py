"""Request preparation: a parsed request checked against the server limits and the model.

``prepare_request`` tokenizes text prompts (already bounded in characters by the protocol),
checks token-id prompts against the vocabulary, the per-prompt and per-request token budgets, the
context length, the decoding method, the exits and the capabilities the request needs (learned
confidence, prompt scoring, per-exit probabilities), and chooses a seed. Every refusal is a
``RequestError`` naming the field of the transport the request came through.
"""

from __future__ import annotations

import dataclasses
import secrets
from dataclasses import dataclass
from typing import NamedTuple

from megatron.early_exit.server.generator import TextGenerator, engine_prompt_ids
from megatron.early_exit.server.protocol import (
    MAX_RANDOM_SEED,
    GenerationRequest,
    RequestError,
    ServerLimits,
    check_prompt_tokens,
)


class RequestFields(NamedTuple):
    """Request field names of one transport, for error messages."""

    prompts: str
    exit_layers: str
    new_tokens: str
    method: str
    measure: str
    score_exit: str = "score_exit_layer"
    max_probs: str = "print_max_prob"
    top_logprobs: str = "logprobs"


GENERATE_FIELDS = RequestFields(
    "prompts", "exit_layers", "tokens_to_generate", "early_exit_method", "early_exit_measure"
)
COMPLETION_FIELDS = RequestFields(
    "prompt", "early_exit.exit_layers", "max_tokens", "early_exit.method", "early_exit.measure"
)
CHAT_FIELDS = RequestFields(
    "messages", "early_exit.exit_layers", "max_tokens", "early_exit.method", "early_exit.measure"
)


@dataclass(frozen=True)
class PreparedRequest:
    """A validated request: parameters (seed chosen, prompts as text) and each prompt's ids."""

    params: GenerationRequest
    prompt_token_ids: tuple[tuple[int, ...], ...]
    """Each prompt's tokens as the engine sees them (BOS included when ``add_bos``)."""


def _prompt_ids(
    generator: TextGenerator, params: GenerationRequest, fields: RequestFields
) -> tuple[tuple[str, ...], tuple[tuple[int, ...], ...]]:
    """Texts and token ids of the prompts (ids as given, or the text tokenized)."""
    tokenizer = generator.tokenizer
    vocab_size = getattr(tokenizer, "vocab_size", None)
    texts, ids = [], []
    for index, prompt in enumerate(params.prompts):
        if isinstance(prompt, str):
            texts.append(prompt)
            ids.append(tuple(tokenizer.tokenize(prompt)))
            continue
        if vocab_size is not None and any(token >= vocab_size for token in prompt):
            raise RequestError(
                f"{fields.prompts}.{index}",
                f"token ids must be below the vocabulary size {vocab_size}",
            )
        texts.append(tokenizer.detokenize(prompt))
        ids.append(tuple(prompt))
    return tuple(texts), tuple(ids)


def _check_budget(counts: list[int], params: GenerationRequest, generator, limits, fields) -> None:
    check_prompt_tokens(counts, limits, fields.prompts)
    if params.max_new_tokens > limits.max_tokens_to_generate:
        raise RequestError(
            fields.new_tokens, f"at most {limits.max_tokens_to_generate} tokens can be generated"
        )
    total = sum(counts) + len(counts) * params.max_new_tokens
    if total > limits.max_request_tokens:
        raise RequestError(
            fields.new_tokens,
            f"prompt plus new tokens of all prompts is {total}, more than the server's "
            f"{limits.max_request_tokens} tokens per request",
            "too_long",
        )
    max_length = generator.max_sequence_length
    if max_length is not None:
        for index, count in enumerate(counts):
            if count + params.max_new_tokens > max_length:
                raise RequestError(
                    fields.new_tokens,
                    f"prompt {index} has {count} tokens; with {params.max_new_tokens} new "
                    f"tokens it exceeds the model's {max_length}-token context",
                    "too_long",
                )


def _check_capabilities(params: GenerationRequest, generator, fields: RequestFields) -> None:
    methods = generator.decoding_methods
    if params.decoding_method not in methods:
        raise RequestError(
            fields.method,
            f"decoding method {params.decoding_method!r} is not available on this server "
            f"(available: {', '.join(methods)})",
        )
    if params.early_exit is not None:
        try:
            params.early_exit.check_model_exits(generator.exit_depths)
        except ValueError as error:
            raise RequestError(fields.exit_layers, str(error)) from None
        measures = getattr(generator, "confidence_measures", None)
        if measures is not None and params.early_exit.measure not in measures:
            raise RequestError(
                fields.measure,
                f"confidence measure {params.early_exit.measure!r} is not available for this "
                f"model (available: {', '.join(measures)}; 'learned' needs exits with "
                "confidence heads)",
            )
    if params.score_prompts and not getattr(generator, "can_score", False):
        raise RequestError(
            fields.prompts, "prompt scoring (echo with logprobs) is not available on this server"
        )
    depth = params.score_exit_depth
    if depth is not None and depth not in generator.exit_depths:
        raise RequestError(
            fields.score_exit,
            f"no exit follows layer {depth} (exits: {list(generator.exit_depths)})",
        )
    if params.print_max_prob and not getattr(generator, "reports_exit_max_probs", False):
        raise RequestError(
            fields.max_probs, "this server's engine does not report per-exit probabilities"
        )
    if params.print_max_prob and params.early_exit and params.decoding_method == "speculative":
        raise RequestError(
            fields.max_probs,
            "per-exit probabilities are not reported with speculative decoding (its tokens "
            "come from the draft exit and the final head's verification, not from exit decisions)",
        )
    alternatives = params.max_new_tokens > 0 and params.num_top_logprobs
    if alternatives and not getattr(generator, "reports_top_logprobs", True):
        raise RequestError(
            fields.top_logprobs,
            "logprob alternatives of generated tokens are not available on this server "
            "(pipeline-parallel decoding does not gather them)",
        )


def prepare_request(
    generator: TextGenerator,
    limits: ServerLimits,
    params: GenerationRequest,
    fields: RequestFields,
) -> PreparedRequest:
    """Check ``params`` against ``limits`` and the model; choose a seed if none was given.

    Raises ``RequestError`` naming the offending field.
    """
    _check_capabilities(params, generator, fields)
    texts, ids = _prompt_ids(generator, params, fields)
    seed = (
        params.random_seed if params.random_seed is not None else secrets.randbelow(MAX_RANDOM_SEED)
    )
    params = dataclasses.replace(params, prompts=texts, prompt_ids=ids, random_seed=seed)
    engine_ids = tuple(engine_prompt_ids(params, generator.tokenizer))
    for index, prompt in enumerate(engine_ids):
        if not prompt:
            raise RequestError(f"{fields.prompts}.{index}", "the prompt has no tokens")
    _check_budget([len(prompt) for prompt in engine_ids], params, generator, limits, fields)
    return PreparedRequest(params, engine_ids)
