"""``FakeGenerator``: a deterministic ``TextGenerator`` for the server tests; no model involved.

Each prompt's continuation is ``script(prompt)`` repeated to ``max_new_tokens`` tokens (stop
strings apply as in the real engine, through ``StopChecker``). With early exit on, a token's
fake confidence at its k-th allowed exit is ``min(0.99, base + 0.15 k)`` with ``base`` a
function of the token id, and it takes the first allowed exit whose confidence reaches the
threshold, else the final head: threshold 0 always takes the first allowed exit, 1.0 never
exits. A token's fake log-prob is ``-(id % 10) / 10``; its ``N`` alternatives are itself and the
``N - 1`` next ids, each 0.5 less likely; its per-exit top probability at depth ``d`` is
``d / (num_layers + 1)``. Prompt scores follow the same rule, shifted by the scoring exit's
depth (``-(id % 10) / 10 - depth / 100``), first token ``None``.

``delay_s`` sleeps per step; ``fail_on`` raises after the first step when a prompt contains
that string. ``calls`` records every params; ``max_active`` the most overlapping calls ever seen.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence

import torch

from megatron.early_exit.inference.sampling import StopChecker
from megatron.early_exit.server.generator import (
    PromptCompletion,
    PromptScores,
    StreamItem,
    TokenEvent,
    Tokenizer,
    engine_prompt_ids,
    results_from_stream,
)
from megatron.early_exit.server.protocol import DECODING_METHODS, GenerationRequest


def _default_script(prompt: str) -> str:
    return f" [{prompt[::-1]}]"


def fake_logprob(token_id: int, depth: int = 0) -> float:
    return -((token_id % 10) / 10) - depth / 100


def fake_alternatives(token_id: int, num: int, depth: int = 0) -> tuple[tuple[int, float], ...]:
    best = fake_logprob(token_id, depth)
    return tuple((token_id + k, best - 0.5 * k) for k in range(num))


class FakeGenerator:
    """A deterministic ``TextGenerator``; see the module docstring."""

    can_score = True
    reports_exit_max_probs = True

    def __init__(
        self,
        tokenizer: Tokenizer | None = None,
        *,
        num_layers: int = 8,
        exit_depths: Sequence[int] = (2, 4, 6),
        script: Callable[[str], str] = _default_script,
        delay_s: float = 0.0,
        max_sequence_length: int | None = None,
        fail_on: str | None = None,
        decoding_methods: Sequence[str] = DECODING_METHODS,
        chat_template: str | None = None,
    ) -> None:
        if tokenizer is None:
            from megatron.early_exit.data.tokenizers import ByteLevelTokenizer

            tokenizer = ByteLevelTokenizer()
        self.tokenizer = tokenizer
        self.num_layers = num_layers
        self.exit_depths = tuple(exit_depths)
        self.max_sequence_length = max_sequence_length
        self.decoding_methods = tuple(decoding_methods)
        self.chat_template = chat_template
        self.script = script
        self.delay_s = delay_s
        self.fail_on = fail_on
        self.calls: list[GenerationRequest] = []
        self.active = 0
        self.max_active = 0
        self._lock = threading.Lock()

    def exit_depth_for(self, token_id: int, params: GenerationRequest) -> int:
        """The fake exit decision for one token."""
        policy = params.early_exit
        if policy is None:
            return self.num_layers
        base = (token_id * 37 % 100) / 100
        allowed = [layer for layer in self.exit_depths if policy.allows(layer)]
        for k, layer in enumerate(allowed):
            if min(0.99, base + 0.15 * k) >= policy.threshold:
                return layer
        return self.num_layers

    def score(self, params: GenerationRequest) -> list[PromptScores]:
        depth = params.score_exit_depth or 0
        with self._lock:
            self.calls.append(params)
        scores = []
        for ids in engine_prompt_ids(params, self.tokenizer):
            logprobs = [None] + [fake_logprob(t, depth) for t in ids[1:]]
            top = [None] + [fake_alternatives(t, params.num_top_logprobs, depth) for t in ids[1:]]
            scores.append(PromptScores(tuple(ids), tuple(logprobs), tuple(top)))
        return scores

    def _continuation(self, prompt: str, num_tokens: int) -> list[int]:
        ids = self.tokenizer.tokenize(self.script(prompt)) or [0]
        return [ids[i % len(ids)] for i in range(num_tokens)]

    def generate(self, params: GenerationRequest) -> list[PromptCompletion]:
        return results_from_stream(self.stream(params), len(params.prompts))

    def stream(self, params: GenerationRequest) -> Iterator[StreamItem]:
        with self._lock:
            self.calls.append(params)
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            yield from self._stream(params)
        finally:
            with self._lock:
                self.active -= 1

    def _stream(self, params: GenerationRequest) -> Iterator[StreamItem]:
        num_prompts = len(params.prompts)
        planned = [self._continuation(p, params.max_new_tokens) for p in params.prompts]
        checker = StopChecker(num_prompts, stop_strings=params.stop_strings)
        rows = [_FakeRow() for _ in range(num_prompts)]
        for step in range(params.max_new_tokens):
            if self.delay_s:
                time.sleep(self.delay_s)
            texts = []
            for index, row in enumerate(rows):
                if not checker.finished[index]:
                    yield row.add(index, planned[index][step], self, params)
                texts.append(self.tokenizer.detokenize(row.token_ids))
            new_tokens = torch.tensor([plan[step] for plan in planned], dtype=torch.long)
            finished_before = checker.finished.clone()
            finished = checker.update(new_tokens, texts)
            if step == 0 and self.fail_on and any(self.fail_on in p for p in params.prompts):
                raise RuntimeError(f"fake failure on a prompt containing {self.fail_on!r}")
            for index in torch.nonzero(finished & ~finished_before).flatten().tolist():
                yield rows[index].result(index, texts[index], checker, "stop")
            if bool(finished.all()):
                return
        for index, row in enumerate(rows):
            if not checker.finished[index]:
                text = self.tokenizer.detokenize(row.token_ids)
                yield row.result(index, text, checker, "length")


class _FakeRow:
    """One prompt's generated tokens inside ``FakeGenerator``."""

    def __init__(self) -> None:
        self.token_ids: list[int] = []
        self.events: list[TokenEvent] = []
        self.text = ""

    def add(self, index: int, token_id: int, fake: FakeGenerator, params) -> TokenEvent:
        self.token_ids.append(token_id)
        text = fake.tokenizer.detokenize(self.token_ids)
        piece, self.text = text[len(self.text) :], text
        depth = fake.exit_depth_for(token_id, params)
        top = None
        if params.num_top_logprobs:
            alternatives = fake_alternatives(token_id, params.num_top_logprobs)
            top = {fake.tokenizer.detokenize([t]): lp for t, lp in alternatives}
        max_probs = None
        if params.print_max_prob:
            evaluated = [d for d in fake.exit_depths if d <= depth] if params.early_exit else []
            max_probs = {d: d / (fake.num_layers + 1) for d in evaluated}
        event = TokenEvent(
            index=index,
            token_id=token_id,
            text=piece,
            exit_depth=depth,
            logprob=fake_logprob(token_id) if params.return_logprobs else None,
            top_logprobs=top,
            exit_max_probs=max_probs,
        )
        self.events.append(event)
        return event

    def result(self, index: int, text: str, checker: StopChecker, reason) -> PromptCompletion:
        kept = self.events
        if reason == "stop":
            reason = checker.reason[index]
            text = text[: checker.truncate_at[index]]
            kept = kept[: checker.num_tokens[index]]
        with_logprobs = bool(kept) and kept[0].logprob is not None
        with_top = bool(kept) and kept[0].top_logprobs is not None
        with_max = bool(kept) and kept[0].exit_max_probs is not None
        return PromptCompletion(
            index=index,
            text=text,
            token_ids=tuple(event.token_id for event in kept),
            segments=tuple(event.text for event in kept),
            exit_depths=tuple(event.exit_depth for event in kept),
            logprobs=tuple(event.logprob for event in kept) if with_logprobs else None,
            top_logprobs=tuple(event.top_logprobs for event in kept) if with_top else None,
            finish_reason=reason,
            exit_max_probs=tuple(event.exit_max_probs for event in kept) if with_max else None,
        )
