"""The load: which requests each client sends, their HTTP form, and what an answer is.

Pure (no network, no torch). A request is one prompt, greedy, of one of three kinds: ``api``
(``PUT /api``), ``completion`` (``POST /v1/completions``) and ``stream`` (the same with
``"stream": true``), with early exit off (``threshold`` None) or at a threshold. The mix is a
function of the seed only: the (kind, threshold) combinations rotate over the flattened request
sequence, so every combination is equally represented however short the run; prompt and
``max_tokens`` are drawn by a seeded ``random.Random``.

An answer is reduced to the fields that must not depend on what else the server is doing
(:func:`answer_of_json`, :func:`answer_of_chunks`): the generated text, the per-token pieces
where the endpoint gives them (``segments`` of ``PUT /api``), the exit layer of every token and
the finish reason. Latency (``request_time``), ids and timestamps are left out.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

KINDS = ("api", "completion", "stream")

# Sentences to cut prompts from (the first ``words`` words of each); written for this benchmark.
SENTENCES = (
    "The committee met on a cold morning in the old town hall to discuss the new bridge over "
    "the river and the cost of building it before winter",
    "She opened the letter slowly and read it twice before she understood what her brother had "
    "been trying to tell her for many years",
    "In the spring the farmers plant corn and beans along the valley and hope that the rains "
    "will come early enough to save the young crops",
    "It was late in the evening when the train finally pulled into the station and the "
    "passengers stepped out into the quiet street",
    "The report says that most of the money was spent on roads and schools while the hospital "
    "waited another year for its new wing",
    "He had never seen the sea before and stood on the beach for a long time watching the waves "
    "come in and go out again",
)


@dataclass(frozen=True)
class ServingRequest:
    """One greedy request; equal requests must get equal answers."""

    kind: str
    """``api``, ``completion`` or ``stream``."""
    prompt: str
    max_tokens: int
    threshold: float | None = None
    """Early-exit threshold; None means early exit off (every token from the final head)."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")

    @property
    def streamed(self) -> bool:
        return self.kind == "stream"

    def route(self) -> tuple[str, str]:
        """``(HTTP method, path)``."""
        return ("PUT", "/api") if self.kind == "api" else ("POST", "/v1/completions")

    def body(self) -> dict:
        """The JSON body (greedy, one prompt)."""
        if self.kind == "api":
            body = {"prompts": [self.prompt], "tokens_to_generate": self.max_tokens,
                    "temperature": 0.0}  # fmt: skip
            if self.threshold is not None:
                body.update(use_early_exit=True, early_exit_thres=self.threshold)
            return body
        body = {"prompt": self.prompt, "max_tokens": self.max_tokens, "temperature": 0.0}
        if self.streamed:
            body["stream"] = True
        if self.threshold is not None:
            body["early_exit"] = {"threshold": self.threshold}
        return body

    def label(self) -> str:
        early_exit = "full" if self.threshold is None else f"ee{self.threshold:g}"
        return f"{self.kind}/{early_exit}/{len(self.prompt.split())}w/{self.max_tokens}t"


def prompts_of(words: Sequence[int], per_length: int) -> list[str]:
    """``per_length`` prompts of each word count in ``words`` (first words of ``SENTENCES``)."""
    if per_length > len(SENTENCES):
        raise ValueError(f"at most {len(SENTENCES)} prompts per length, got {per_length}")
    longest = min(len(s.split()) for s in SENTENCES)
    if any(not 1 <= w <= longest for w in words):
        raise ValueError(f"prompt word counts must lie in [1, {longest}], got {list(words)}")
    return [" ".join(SENTENCES[i].split()[:w]) for w in words for i in range(per_length)]


def build_mix(
    seed: int,
    num_clients: int,
    requests_per_client: int,
    prompts: Sequence[str],
    max_tokens: Sequence[int],
    thresholds: Sequence[float | None],
    kinds: Sequence[str] = KINDS,
) -> list[list[ServingRequest]]:
    """Each client's requests, in sending order; a function of the arguments only."""
    if num_clients < 1 or requests_per_client < 1:
        raise ValueError("num_clients and requests_per_client must be >= 1")
    if not (prompts and max_tokens and thresholds and kinds):
        raise ValueError("prompts, max_tokens, thresholds and kinds must be non-empty")
    combos = list(itertools.product(kinds, thresholds))
    rng = random.Random(seed)
    rng.shuffle(combos)
    flat = [
        ServingRequest(kind, rng.choice(prompts), rng.choice(max_tokens), threshold)
        for kind, threshold in itertools.islice(
            itertools.cycle(combos), num_clients * requests_per_client
        )
    ]
    # Deal round-robin: at any moment the clients are sending different combinations.
    return [flat[client::num_clients] for client in range(num_clients)]


def distinct(requests: Iterable[ServingRequest]) -> list[ServingRequest]:
    """The distinct requests, in first-seen order."""
    return list(dict.fromkeys(requests))


def check_fit(
    requests: Iterable[ServingRequest], prompt_tokens: Mapping[str, int], max_sequence_length: int
) -> list[str]:
    """One message per distinct (prompt, max_tokens) whose prompt tokens plus new tokens exceed
    ``max_sequence_length``; ``prompt_tokens`` maps each prompt to its token count."""
    problems = []
    for prompt, max_tokens in dict.fromkeys((r.prompt, r.max_tokens) for r in requests):
        needed = prompt_tokens[prompt] + max_tokens
        if needed > max_sequence_length:
            problems.append(
                f"{prompt_tokens[prompt]} prompt tokens + {max_tokens} new tokens = {needed} > "
                f"{max_sequence_length} ({prompt[:40]!r})"
            )
    return problems


def answer_of_json(request: ServingRequest, body: Mapping) -> dict:
    """The comparable part of a non-streamed answer (``PUT /api`` or ``/v1/completions``)."""
    if request.kind == "api":
        return {
            "text": body["text"][0],
            "pieces": list(body["segments"][0]),
            "exit_layers": list(body["exit_layers"][0]),
            "finish_reason": None,
        }
    choice = body["choices"][0]
    return {
        "text": choice["text"],
        "pieces": None,
        "exit_layers": list(choice.get("exit_layers") or []),
        "finish_reason": choice.get("finish_reason"),
    }


def answer_of_chunks(chunks: Iterable[Mapping]) -> dict:
    """The comparable part of a streamed answer: its chunks' text and exit layers joined."""
    text, exit_layers, finish_reason = [], [], None
    for chunk in chunks:
        for choice in chunk.get("choices", []):
            text.append(choice.get("text", ""))
            exit_layers.extend(choice.get("exit_layers") or [])
            finish_reason = choice.get("finish_reason") or finish_reason
    return {"text": "".join(text), "pieces": None, "exit_layers": exit_layers,
            "finish_reason": finish_reason}  # fmt: skip


def generated_tokens(answer: Mapping) -> int:
    """Tokens generated for an answer (every token reports its exit layer)."""
    return len(answer["exit_layers"])
