"""The service's ``TextGenerator`` backed by the real generation engine (any TP and PP).

With PP=1 the methods are KV recomputation (``auto``) and self-speculation; with PP>1 the only
early-exit method is pipelined decoding (``auto``), and ``recompute``/``speculative`` are refused
by the service as unavailable on this server.

Maps the transport-independent ``protocol.GenerationRequest`` onto the engine's own
``inference.generate.GenerationParams`` and its per-prompt results back onto the service's
``PromptCompletion`` (text cut at stop strings/EOS, per-token text pieces and exit layers).
Exit layers are reported as depths (the number of layers below the head), the final head as
``num_layers``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from megatron.early_exit.inference.decide import CONFIDENCE_MEASURES, LOGIT_MEASURES, ExitPolicy
from megatron.early_exit.inference.generate import GenerationParams, generate
from megatron.early_exit.inference.scoring import score_prompts
from megatron.early_exit.model.builder import unwrap_model
from megatron.early_exit.server.generator import (
    PromptCompletion,
    PromptScores,
    StreamItem,
    engine_prompt_ids,
    stream_from_results,
)
from megatron.early_exit.server.protocol import GenerationRequest
from megatron.early_exit.server.text import token_pieces

_ENGINE_PARAMS = {field.name for field in dataclasses.fields(GenerationParams)}


class EngineGenerator:
    """A ``TextGenerator`` over an EarlyExitGPTModel and its tokenizer."""

    def __init__(self, model, tokenizer, max_sequence_length: int | None = None):
        self.model = unwrap_model(model)
        self._tokenizer = tokenizer
        self._max_sequence_length = max_sequence_length or self.model.max_sequence_length
        self._pipelined = self.model.config.pipeline_model_parallel_size > 1

    @property
    def confidence_measures(self) -> tuple[str, ...]:
        """``learned`` only when every exit has a confidence head."""
        heads = self.model.config.exit_heads
        if heads and all(e.confidence_hidden_size for e in heads):
            return CONFIDENCE_MEASURES
        return LOGIT_MEASURES

    @property
    def can_score(self) -> bool:
        """Prompt scoring runs the model's whole forward: one pipeline stage only."""
        return not self._pipelined

    @property
    def reports_exit_max_probs(self) -> bool:
        """Whether the engine reports each exit's top probability (``print_max_prob``)."""
        return "exit_max_probs" in _ENGINE_PARAMS

    @property
    def chat_template(self) -> str | None:
        return getattr(self._tokenizer, "chat_template", None)

    def score(self, params: GenerationRequest) -> list[PromptScores]:
        """Prompt tokens' log-probs by a full no-cache forward (every TP rank calls it)."""
        prompts = engine_prompt_ids(params, self._tokenizer)
        scored = score_prompts(
            self.model, prompts, params.score_exit_depth, params.num_top_logprobs
        )
        return [
            PromptScores(tuple(ids), tuple(s.logprobs), tuple(map(_tuples, s.top)))
            for ids, s in zip(prompts, scored)
        ]

    @property
    def decoding_methods(self) -> tuple[str, ...]:
        if self._pipelined:
            return ("auto", "pipelined")
        return ("auto", "recompute", "speculative")

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def num_layers(self) -> int:
        return self.model.config.num_layers

    @property
    def exit_depths(self) -> tuple[int, ...]:
        return tuple(e.depth for e in self.model.config.exit_heads)

    @property
    def max_sequence_length(self) -> int | None:
        return self._max_sequence_length

    def generate(self, params: GenerationRequest) -> list[PromptCompletion]:
        if params.prompt_ids is not None:
            prompts = [list(ids) or [self._tokenizer.eod] for ids in engine_prompt_ids(
                params, self._tokenizer)]  # fmt: skip
        else:
            prompts = [self._prompt_ids(text, params.add_bos) for text in params.prompts]
        if params.max_new_tokens == 0:
            return [PromptCompletion(i, "", (), (), ()) for i in range(len(prompts))]
        results = generate(self.model, prompts, self._engine_params(params))
        return [self._result(i, r, params) for i, r in enumerate(results)]

    def stream(self, params: GenerationRequest) -> Iterator[StreamItem]:
        yield from stream_from_results(self.generate(params))

    def _prompt_ids(self, text: str, add_bos: bool) -> list[int]:
        ids = self._tokenizer.tokenize(text)
        bos = getattr(self._tokenizer, "bos", None)
        if add_bos:
            ids = [bos if bos is not None else self._tokenizer.eod, *ids]
        return ids or [self._tokenizer.eod]  # the engine needs at least one prompt token

    def _engine_params(self, params: GenerationRequest) -> GenerationParams:
        method = params.decoding_method
        if method == "auto":
            method = "pipelined" if self._pipelined else "recompute"
        extra = {}  # fields of the token-by-token engine, passed once it has them
        if "top_logprobs" in _ENGINE_PARAMS:
            extra["top_logprobs"] = params.num_top_logprobs
        if "exit_max_probs" in _ENGINE_PARAMS:
            extra["exit_max_probs"] = params.print_max_prob
        return GenerationParams(
            **extra,
            max_new_tokens=params.max_new_tokens,
            temperature=params.temperature,
            top_k=params.top_k,
            top_p=params.top_p,
            early_exit=params.early_exit is not None,
            method=method,
            exit_policy=params.early_exit or ExitPolicy(),
            eos_token_ids=(self._tokenizer.eod,),
            stop_strings=params.stop_strings,
            detokenize=self._tokenizer.detokenize,
            pad_token_id=self._tokenizer.eod,
            seed=params.random_seed if params.random_seed is not None else 1234,
        )

    def _result(self, index: int, result, params: GenerationRequest) -> PromptCompletion:
        pieces = token_pieces(self._tokenizer, result.tokens)
        text = result.text if result.text is not None else "".join(pieces)
        top = getattr(result, "top_logprobs", None)
        max_probs = getattr(result, "exit_max_probs", None)
        return PromptCompletion(
            index=index,
            text=text,
            token_ids=tuple(result.tokens),
            segments=tuple(pieces),
            exit_depths=tuple(result.exit_depths),
            logprobs=tuple(result.logprobs) if params.return_logprobs else None,
            top_logprobs=self._top_text(top) if params.num_top_logprobs and top else None,
            finish_reason=result.finish_reason,
            exit_max_probs=tuple(map(dict, max_probs))
            if params.print_max_prob and max_probs
            else None,
        )

    def _top_text(self, top) -> tuple[dict[str, float], ...]:
        """The engine's ``(token id, log-prob)`` alternatives as ``{token text: log-prob}``."""
        detokenize = self._tokenizer.detokenize
        return tuple({detokenize([t]): float(lp) for t, lp in token} for token in top)


def _tuples(alternatives) -> tuple[tuple[int, float], ...] | None:
    return None if alternatives is None else tuple((int(t), float(p)) for t, p in alternatives)
