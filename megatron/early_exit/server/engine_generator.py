"""The service's ``TextGenerator`` backed by the real generation engine (any TP and PP).

With PP=1 the methods are KV recomputation (``auto``) and self-speculation; with PP>1 the only
early-exit method is pipelined decoding (``auto``), and ``recompute``/``speculative`` are refused
by the service as unavailable on this server.

Maps the transport-independent ``protocol.GenerationRequest`` onto the engine's own
``inference.generate.GenerationParams`` and its per-prompt results back onto the service's
``PromptCompletion`` (text cut at stop strings/EOS, per-token text pieces and exit layers).
Exit layers are reported as depths (the number of layers below the head), the final head as
``num_layers``.

Continuous batching (one process, ``continuous=True``): requests run on a
:class:`~megatron.early_exit.inference.batching.ContinuousBatcher`, whose thread decodes every
running request in one batch; ``generate``/``stream``/``score`` may then be called from many
threads at once (``concurrent``), take the client's ``cancelled`` event (set: the request's rows
leave the batch at the next step) and the service's time limit. Otherwise each call decodes its
request alone on the calling thread (every rank of a multi-rank server in lockstep).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from megatron.early_exit.inference.batching import ContinuousBatcher
from megatron.early_exit.inference.decide import CONFIDENCE_MEASURES, LOGIT_MEASURES, ExitPolicy
from megatron.early_exit.inference.generate import GenerationParams, generate, generate_stream
from megatron.early_exit.inference.scoring import score_prompts
from megatron.early_exit.model.builder import unwrap_model
from megatron.early_exit.server.generator import (
    PromptCompletion,
    PromptScores,
    StreamItem,
    TokenEvent,
    engine_prompt_ids,
)
from megatron.early_exit.server.protocol import GenerationRequest
from megatron.early_exit.server.text import grown_text, token_pieces


class EngineGenerator:
    """A ``TextGenerator`` over an EarlyExitGPTModel and its tokenizer."""

    def __init__(
        self,
        model,
        tokenizer,
        max_sequence_length: int | None = None,
        *,
        continuous: bool = False,
        max_batch_rows: int = 64,
    ):
        self.model = unwrap_model(model)
        self._tokenizer = tokenizer
        self._max_sequence_length = max_sequence_length or self.model.max_sequence_length
        self._pipelined = self.model.config.pipeline_model_parallel_size > 1
        self._batcher = ContinuousBatcher(self.model, max_batch_rows) if continuous else None

    @property
    def concurrent(self) -> bool:
        """Whether calls may overlap (continuous batching): the service then waits on many
        requests at once instead of running them one by one."""
        return self._batcher is not None

    def batching_statistics(self) -> dict | None:
        """The continuous batcher's counters (None when serial)."""
        return None if self._batcher is None else self._batcher.statistics()

    def close(self) -> None:
        """Finish the running requests and stop the batching thread (if any)."""
        if self._batcher is not None:
            self._batcher.close()

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
        """Whether the engine reports each exit's top probability (``print_max_prob``): with
        PP=1 and full decoding or KV recomputation (the service refuses it with speculation)."""
        return not self._pipelined

    @property
    def reports_top_logprobs(self) -> bool:
        """Whether generated tokens come with logprob alternatives (PP=1)."""
        return not self._pipelined

    @property
    def chat_template(self) -> str | None:
        return getattr(self._tokenizer, "chat_template", None)

    def score(self, params: GenerationRequest) -> list[PromptScores]:
        """Prompt tokens' log-probs by a full no-cache forward (every TP rank calls it; with
        continuous batching on the batching thread, between two steps)."""
        if self._batcher is not None:
            return self._batcher.call(lambda: self._score(params))
        return self._score(params)

    def _score(self, params: GenerationRequest) -> list[PromptScores]:
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
        if not self.exit_depths:  # nothing to draft with or exit at: the service answers 400
            return ("auto",)
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

    def generate(
        self,
        params: GenerationRequest,
        cancelled: threading.Event | None = None,
        time_limit_s: float | None = None,
    ) -> list[PromptCompletion]:
        """One result per prompt. ``cancelled`` and ``time_limit_s`` apply with continuous
        batching (``RequestCancelled`` / ``TimeLimitExceeded`` from ``inference.batching``)."""
        prompts = self._prompts(params)
        if params.max_new_tokens == 0:
            return [PromptCompletion(i, "", (), (), ()) for i in range(len(prompts))]
        if self._batcher is None:
            results = generate(self.model, prompts, self._engine_params(params))
        else:
            request = self._batcher.submit(
                prompts, self._engine_params(params), time_limit_s, cancelled, stream=False
            )
            results = list(request)[-1].results
        return [self._result(i, r, params) for i, r in enumerate(results)]

    def stream(
        self,
        params: GenerationRequest,
        cancelled: threading.Event | None = None,
        time_limit_s: float | None = None,
    ) -> Iterator[StreamItem]:
        """Token events as the engine decodes them (each step's kept tokens, prompt order within
        a step), then one ``PromptCompletion`` per prompt (``cancelled``, ``time_limit_s``: as
        :meth:`generate`)."""
        prompts = self._prompts(params)
        if params.max_new_tokens == 0:
            yield from (PromptCompletion(i, "", (), (), ()) for i in range(len(prompts)))
            return
        texts = [""] * len(prompts)
        tokens: list[list[int]] = [[] for _ in prompts]
        if self._batcher is None:
            updates = generate_stream(self.model, prompts, self._engine_params(params))
        else:
            updates = self._batcher.submit(
                prompts, self._engine_params(params), time_limit_s, cancelled
            )
        for update in updates:
            if update.results is not None:
                for index, result in enumerate(update.results):
                    yield self._result(index, result, params)
                return
            for index, new_tokens in enumerate(update.tokens):
                for position, token_id in enumerate(new_tokens):
                    tokens[index].append(token_id)
                    # A character split over tokens arrives whole with the token completing it.
                    text = grown_text(self._tokenizer, tokens[index], texts[index])
                    piece = "" if text is None else text[len(texts[index]) :]
                    texts[index] = texts[index] if text is None else text
                    yield self._event(update, index, position, token_id, piece, params)

    def _event(self, update, index, position, token_id, piece, params) -> TokenEvent:
        top = update.top_logprobs[index][position] if params.num_top_logprobs else None
        max_probs = update.exit_max_probs[index][position] if params.print_max_prob else None
        return TokenEvent(
            index=index,
            token_id=token_id,
            text=piece,
            exit_depth=update.exit_depths[index][position],
            logprob=update.logprobs[index][position] if params.return_logprobs else None,
            top_logprobs=None if top is None else self._top_text([top])[0],
            exit_max_probs=None if max_probs is None else dict(max_probs),
        )

    def _prompts(self, params: GenerationRequest) -> list[list[int]]:
        if params.prompt_ids is not None:
            return [list(ids) or [self._tokenizer.eod]
                    for ids in engine_prompt_ids(params, self._tokenizer)]  # fmt: skip
        return [self._prompt_ids(text, params.add_bos) for text in params.prompts]

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
        return GenerationParams(
            top_logprobs=params.num_top_logprobs if not self._pipelined else 0,
            exit_max_probs=params.print_max_prob,
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
