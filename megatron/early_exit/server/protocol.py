"""Request/response types of the generation server, and their one internal form.

Two transports share one service: the Megatron/EE-LLM style ``PUT /api`` (``GenerateRequest``,
``GenerateResponse``) and the OpenAI style ``POST /v1/completions`` (``CompletionRequest``,
``CompletionResponse``, ``CompletionChunk`` for server-sent events). Both requests map onto the
frozen ``GenerationRequest`` (``params_from_generate``, ``params_from_completion``), the only type
the service layer sees (chat requests are in ``chat.py``; they map onto it too). Completion
prompts may be text or token ids; standard OpenAI fields the server does not implement are
accepted at their neutral values only (``NEUTRAL_FIELDS``), anything else is a 400 naming them.

Everything a client sends is bounded by ``ServerLimits`` before it costs work: prompt characters
(before tokenizing), token-id counts, prompts x new tokens, stop strings (count and length), free
text fields such as ``model`` and ``user``.

Validation is strict (JSON types are not coerced: ``"true"`` or ``1`` is not a boolean, ``"64"``
is not an integer) and unknown fields are rejected. Server limits are applied through the
validation context: use ``parse_generate_request`` / ``parse_completion_request``. Convert errors
for the client with ``error_body``.

Fixes relative to the original server: ``use_early_exit`` and ``print_max_prob`` are real booleans
(``false`` is off); ``early_exit_thres`` accepts integers and defaults to a threshold that exits;
``stop_sequences`` are strings matched on the generated text; unsupported fields are rejected
instead of silently ignored; the response field is ``request_time`` (not ``requst_time``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from megatron.early_exit.inference.decide import (
    CONFIDENCE_MEASURES,
    DEFAULT_CONFIDENCE_MEASURE,
    DEFAULT_EARLY_EXIT_THRESHOLD,
    ExitPolicy,
)

ConfidenceMeasure = Literal["max_prob", "margin", "entropy", "learned"]
assert set(get_args(ConfidenceMeasure)) == set(CONFIDENCE_MEASURES)
DecodingMethod = Literal["auto", "recompute", "pipelined", "speculative"]
DECODING_METHODS: tuple[str, ...] = get_args(DecodingMethod)
MAX_RANDOM_SEED = 2**63 - 1


@dataclass(frozen=True)
class ServerLimits:
    """Per-server bounds on a request; the defaults match the original server's 128 prompts.

    Everything a client controls is bounded before the work it causes: the body before parsing,
    each prompt's characters before tokenizing, prompts x new tokens before queueing.
    """

    max_prompts: int = 128
    """Most prompts in one request."""
    max_prompt_tokens: int = 4096
    """Most tokens in one prompt (checked after tokenization: ``check_prompt_tokens``)."""
    max_tokens_to_generate: int = 1024
    """Most new tokens per prompt."""
    max_body_bytes: int = 4 * 1024 * 1024
    """Largest request body, checked while it is read (413 beyond)."""
    max_prompt_chars: int | None = None
    """Most characters in one text prompt, checked before tokenizing; None means
    ``16 * max_prompt_tokens`` (no tokenizer in use averages 16 characters per token)."""
    max_request_tokens: int = 65536
    """Most prompts x new tokens per request (and, after tokenizing, prompt plus new tokens)."""
    max_stop_strings: int = 16
    """Most stop strings per request."""
    max_stop_chars: int = 256
    """Longest stop string."""
    max_field_chars: int = 256
    """Longest free-text field that is not a prompt (``model``, ``user``, a chat ``name``)."""
    max_messages: int = 256
    """Most messages in one chat request."""
    max_queued_requests: int = 32
    """Most requests waiting or running; one more is answered 503."""
    max_request_seconds: float = 300.0
    """Longest a request may wait and run (continuous batching; a serial server, whose ranks
    decode in lockstep, runs each request to its end); past it the request is stopped (504)."""

    def __post_init__(self) -> None:
        for name, value in dataclasses.asdict(self).items():
            if value is not None and value < 1:
                raise ValueError(f"ServerLimits.{name} must be >= 1, got {value}")

    @property
    def prompt_chars(self) -> int:
        """The effective ``max_prompt_chars``."""
        return self.max_prompt_chars or 16 * self.max_prompt_tokens


class RequestError(ValueError):
    """A request rejected outside pydantic validation (e.g. prompt too long after tokenization)."""

    def __init__(self, field: str | None, message: str, error_type: str = "value_error") -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message
        self.error_type = error_type


def _field_error(field: str, message: str) -> PydanticCustomError:
    """A model-level validation error that still names its field (read back by ``error_body``)."""
    return PydanticCustomError("value_error", "{field}: " + message, {"field": field})


def _limits(info: ValidationInfo) -> ServerLimits:
    context = info.context or {}
    return context.get("limits") or ServerLimits()


def _as_list(value: Any) -> Any:
    if value is None:
        return []
    return [value] if isinstance(value, str) else value


def _as_prompt_list(value: Any) -> Any:
    """A prompt, a list of prompts, token ids or a list of token-id lists -> a list of prompts."""
    if isinstance(value, list) and value and all(type(v) is int for v in value):
        return [value]
    return _as_list(value)


def _check_prompt_count(prompts: list, info: ValidationInfo) -> list:
    limits = _limits(info)
    if len(prompts) > limits.max_prompts:
        raise ValueError(f"at most {limits.max_prompts} prompts per request, got {len(prompts)}")
    for index, prompt in enumerate(prompts):
        # bounded before tokenizing: the characters of text, the count of token ids
        if isinstance(prompt, str) and len(prompt) > limits.prompt_chars:
            raise PydanticCustomError(
                "too_long",
                "prompt {index} has {count} characters, at most {limit} are allowed",
                {"index": index, "count": len(prompt), "limit": limits.prompt_chars},
            )
        if isinstance(prompt, list):
            if len(prompt) > limits.max_prompt_tokens:
                raise PydanticCustomError(
                    "too_long",
                    "prompt {index} has {count} tokens, at most {limit} are allowed",
                    {"index": index, "count": len(prompt), "limit": limits.max_prompt_tokens},
                )
            if any(token < 0 for token in prompt):
                raise ValueError(f"prompt {index}: token ids must be >= 0")
    return prompts


def _check_new_tokens(value: int, info: ValidationInfo) -> int:
    max_tokens = _limits(info).max_tokens_to_generate
    if value > max_tokens:
        raise ValueError(f"at most {max_tokens} tokens can be generated, got {value}")
    return value


def _check_exit_layers(value: list[int] | None) -> list[int] | None:
    if value is not None and len(set(value)) != len(value):
        raise ValueError(f"exit layers must be unique, got {value}")
    return value


def _check_stop_strings(value: list[str], info: ValidationInfo) -> list[str]:
    limits = _limits(info)
    if len(value) > limits.max_stop_strings:
        raise ValueError(f"at most {limits.max_stop_strings} stop strings, got {len(value)}")
    if any(not stop for stop in value):
        raise ValueError("stop strings must be non-empty")
    if any(len(stop) > limits.max_stop_chars for stop in value):
        raise ValueError(f"stop strings must have at most {limits.max_stop_chars} characters")
    return value


def _check_field_chars(value: str | None, info: ValidationInfo) -> str | None:
    limit = _limits(info).max_field_chars
    if value is not None and len(value) > limit:
        raise ValueError(f"at most {limit} characters, got {len(value)}")
    return value


def _check_request_tokens(
    num_prompts: int, new_tokens: int, info: ValidationInfo, field: str
) -> None:
    """Prompts x new tokens bounded before any prompt is tokenized."""
    limit = _limits(info).max_request_tokens
    if num_prompts * new_tokens > limit:
        raise _field_error(
            field,
            f"{num_prompts} prompts x {new_tokens} new tokens exceeds the server's {limit} "
            "tokens per request",
        )


_STRICT_NO_EXTRA = ConfigDict(extra="forbid", strict=True)
PromptList = Annotated[
    list[str], BeforeValidator(_as_list), Field(min_length=1), AfterValidator(_check_prompt_count)
]
PromptOrIdsList = Annotated[
    list[str | list[int]],
    BeforeValidator(_as_prompt_list),
    Field(min_length=1),
    AfterValidator(_check_prompt_count),
]
ShortText = Annotated[str | None, AfterValidator(_check_field_chars)]
NewTokens = Annotated[int, Field(ge=0), AfterValidator(_check_new_tokens)]
StopStrings = Annotated[list[str], BeforeValidator(_as_list), AfterValidator(_check_stop_strings)]
ExitLayers = Annotated[list[Annotated[int, Field(gt=0)]] | None, AfterValidator(_check_exit_layers)]
_EXIT_LAYERS_DOC = "Exits allowed to fire, by the layer they follow; None or [] allows all exits."

# Fields of the original server that are rejected with a reason instead of silently ignored.
_UNSUPPORTED_GENERATE_FIELDS = {
    "beam_width": "beam search is not supported (the original server accepted beam_width but "
    "never ran beam search); remove the field",
    "length_penalty": "length_penalty is not supported (it only applies to beam search); "
    "remove the field",
    "max_len": "max_len is not supported; use tokens_to_generate",
    "sentences": "sentences is not supported; use prompts",
    "top_p_decay": "decaying top-p (top_p_decay, top_p_bound) is not supported; remove the field",
    "top_p_bound": "decaying top-p (top_p_decay, top_p_bound) is not supported; remove the field",
    "prevent_newline_after_colon": "prevent_newline_after_colon is not supported; "
    "use stop_sequences instead",
}


class GenerateRequest(BaseModel):
    """Body of ``PUT /api`` (Megatron / EE-LLM text-generation server)."""

    model_config = _STRICT_NO_EXTRA

    prompts: PromptList = Field(description="One prompt or a list of prompts.")
    tokens_to_generate: NewTokens = Field(64, description="New tokens per prompt.")
    logprobs: bool = Field(False, description="Return the log-prob of each token.")
    temperature: float = Field(0.0, ge=0.0, le=100.0, description="0 means greedy (EE-LLM).")
    top_k: int = Field(0, ge=0, le=1000, description="0 disables top-k; needs temperature > 0.")
    top_p: float = Field(0.0, ge=0.0, le=1.0, description="0 disables top-p; excludes top_k.")
    add_BOS: bool = Field(False, description="Prepend the BOS/EOD token to each prompt.")
    stop_sequences: StopStrings = Field(default_factory=list, description="Stop strings.")
    random_seed: int = Field(1234, ge=0, le=MAX_RANDOM_SEED)
    echo_prompts: bool = Field(False, description="Include the prompt in text and segments.")
    use_early_exit: bool = Field(False, description="Enable early exit; false means off.")
    early_exit_thres: float = Field(DEFAULT_EARLY_EXIT_THRESHOLD, ge=0.0, le=1.0)
    exit_layers: ExitLayers = Field(None, description=_EXIT_LAYERS_DOC)
    early_exit_measure: ConfidenceMeasure = DEFAULT_CONFIDENCE_MEASURE
    early_exit_method: DecodingMethod = Field("auto", description="How skipped layers get KV.")
    print_max_prob: bool = Field(
        False, description="Report each generated token's top probability at every exit."
    )
    score_exit_layer: int | None = Field(
        None, gt=0, description="Extension: score prompts (tokens_to_generate=0) by this exit."
    )
    no_log: bool = Field(False, description="Do not log this request.")

    @model_validator(mode="before")
    @classmethod
    def _reject_unsupported(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            for name, reason in _UNSUPPORTED_GENERATE_FIELDS.items():
                if name in data:
                    raise _field_error(name, reason)
        return data

    @model_validator(mode="after")
    def _check_combinations(self, info: ValidationInfo) -> GenerateRequest:
        _check_request_tokens(
            len(self.prompts), self.tokens_to_generate, info, "tokens_to_generate"
        )
        if self.score_exit_layer is not None and self.tokens_to_generate != 0:
            raise _field_error(
                "score_exit_layer", "scores prompts: needs tokens_to_generate=0 and logprobs=true"
            )
        if self.top_k > 0 and self.top_p > 0:
            raise _field_error("top_p", "top_k and top_p are mutually exclusive")
        if not self.add_BOS:
            for index, prompt in enumerate(self.prompts):
                if not prompt:
                    raise _field_error(f"prompts.{index}", "empty prompt needs add_BOS=true")
        return self


class GenerateResponse(BaseModel):
    """Body returned by ``PUT /api``."""

    text: list[str]
    """Generated text per prompt (prompt included when ``echo_prompts``)."""
    segments: list[list[str]]
    """Per prompt, the text of each token."""
    logprobs: list[list[float]] | None = None
    """Per prompt, the log-prob of each token; None unless requested."""
    exit_layers: list[list[int]]
    """Per prompt, per *generated* token: the layer of the exit that produced it. Tokens from the
    final head report the model's ``num_layers``, so early exit off gives all ``num_layers``."""
    max_probs: list[list[dict[int, float]]] | None = None
    """With ``print_max_prob``: per prompt, per generated token, the top probability of every exit
    evaluated for it, by exit layer (EE-LLM's ``print_max_prob``, returned instead of printed)."""
    request_time: float
    """Wall time of the request in seconds."""


NEUTRAL_FIELDS: dict[str, Any] = {
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "logit_bias": {},
    "best_of": 1,
    "suffix": None,
}
"""OpenAI fields this server does not implement, accepted at these (neutral) values only."""


def check_neutral_fields(request: BaseModel) -> None:
    """Refuse a non-neutral value of a standard field the server does not implement."""
    for name, neutral in NEUTRAL_FIELDS.items():
        if name in type(request).model_fields and getattr(request, name) != neutral:
            raise _field_error(
                name,
                f"only the neutral value {neutral!r} is supported (this server does not "
                f"implement {name}); remove the field or send {neutral!r}",
            )


class StreamOptions(BaseModel):
    """OpenAI ``stream_options``: the final usage chunk is always sent."""

    model_config = _STRICT_NO_EXTRA

    include_usage: bool = True
    continuous_usage_stats: bool = False

    @field_validator("continuous_usage_stats")
    @classmethod
    def _no_continuous(cls, value: bool) -> bool:
        if value:
            raise ValueError("continuous usage statistics are not supported")
        return value


class EarlyExitOptions(BaseModel):
    """The ``early_exit`` extension object of ``POST /v1/completions``."""

    model_config = _STRICT_NO_EXTRA

    enabled: bool = Field(True, description="Present means on unless enabled is false.")
    threshold: float = Field(DEFAULT_EARLY_EXIT_THRESHOLD, ge=0.0, le=1.0)
    exit_layers: ExitLayers = Field(None, description=_EXIT_LAYERS_DOC)
    measure: ConfidenceMeasure = DEFAULT_CONFIDENCE_MEASURE
    method: DecodingMethod = "auto"


class CompletionRequest(BaseModel):
    """Body of ``POST /v1/completions`` (OpenAI legacy completions, with an early-exit extension).

    Defaults follow OpenAI: ``max_tokens=16``, ``temperature=1``, ``top_p=1``; temperature 0 is
    greedy. ``logprobs=N`` asks for the chosen token's log-prob plus the top ``N`` alternatives.
    """

    model_config = _STRICT_NO_EXTRA

    model: ShortText = None
    prompt: PromptOrIdsList = Field(
        description="A prompt, a list of prompts, token ids or a list of token-id lists."
    )
    max_tokens: NewTokens = 16
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = 1
    stop: StopStrings = Field(default_factory=list, description="Stop string(s).")
    stream: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)
    seed: int | None = Field(None, ge=0, le=MAX_RANDOM_SEED)
    echo: bool = False
    early_exit: EarlyExitOptions | None = None
    score_exit_layer: int | None = Field(
        None, gt=0, description="Extension: the exit whose log-probs score echoed prompt tokens."
    )
    # Standard OpenAI fields accepted at their neutral values only (NEUTRAL_FIELDS).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] = Field(default_factory=dict)
    user: ShortText = None
    best_of: int = 1
    stream_options: StreamOptions | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _non_empty_prompts(cls, prompts: list) -> list:
        if any(len(prompt) == 0 for prompt in prompts):
            raise ValueError("prompts must be non-empty (text or token ids)")
        return prompts

    @model_validator(mode="after")
    def _check_work(self, info: ValidationInfo) -> CompletionRequest:
        check_neutral_fields(self)
        _check_request_tokens(len(self.prompt), self.max_tokens, info, "max_tokens")
        if self.score_exit_layer is not None and not (self.echo and self.logprobs is not None):
            raise _field_error(
                "score_exit_layer", "scores echoed prompts: needs echo=true and logprobs"
            )
        return self

    @field_validator("n")
    @classmethod
    def _single_choice(cls, value: int) -> int:
        if value != 1:
            raise ValueError(f"only n=1 is supported, got {value}")
        return value


FinishReason = Literal["stop", "length"]


class CompletionLogprobs(BaseModel):
    """OpenAI legacy ``logprobs`` object of one choice."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None = None
    """Per token, the most likely alternatives (token text -> log-prob); None for the first
    echoed prompt token, and for generated tokens when the engine does not report them."""
    text_offset: list[int]


class CompletionChoice(BaseModel):
    """One choice of a completion or of a streamed chunk."""

    index: int
    text: str
    finish_reason: FinishReason | None = None
    logprobs: CompletionLogprobs | None = None
    exit_layers: list[int] | None = None
    """Extension: per generated token (in this choice or chunk), the exit layer that produced it;
    the final head reports the model's ``num_layers``."""


class CompletionUsage(BaseModel):
    """Token counts of a completion."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(BaseModel):
    """Body returned by ``POST /v1/completions`` without streaming."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage


class CompletionChunk(BaseModel):
    """One server-sent event of a streamed completion; ``usage`` only on the last one, if any."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage | None = None


def _check_text_chars(value: str, info: ValidationInfo) -> str:
    limit = _limits(info).prompt_chars
    if len(value) > limit:
        raise ValueError(f"at most {limit} characters, got {len(value)}")
    return value


def _check_token_count(value: list[int], info: ValidationInfo) -> list[int]:
    limit = _limits(info).max_prompt_tokens
    if len(value) > limit:
        raise ValueError(f"at most {limit} tokens, got {len(value)}")
    return value


class TokenizeRequest(BaseModel):
    """Body of ``POST /tokenize`` (the form lm-evaluation-harness' remote tokenizer sends)."""

    model_config = _STRICT_NO_EXTRA

    model: ShortText = None
    prompt: Annotated[str, AfterValidator(_check_text_chars)]
    add_special_tokens: bool = False


class DetokenizeRequest(BaseModel):
    """Body of ``POST /detokenize``."""

    model_config = _STRICT_NO_EXTRA

    model: ShortText = None
    tokens: Annotated[list[Annotated[int, Field(ge=0)]], AfterValidator(_check_token_count)]


# ------------------------------------------------------------------------------ internal form


@dataclass(frozen=True)
class GenerationRequest:
    """Transport-independent generation settings: what the service layer consumes."""

    prompts: tuple[str | tuple[int, ...], ...]
    """Text prompts, or token ids as the client sent them; the service's preparation makes them
    all text (detokenized ids) and fills ``prompt_ids``."""
    max_new_tokens: int
    temperature: float = 0.0
    """0 means greedy."""
    top_k: int = 0
    """0 disables top-k."""
    top_p: float = 0.0
    """0 (or 1) disables top-p."""
    add_bos: bool = False
    stop_strings: tuple[str, ...] = ()
    random_seed: int | None = None
    """None lets the service pick a seed."""
    echo_prompts: bool = False
    return_logprobs: bool = False
    num_top_logprobs: int = 0
    """Alternatives per token to report (OpenAI ``logprobs=N``); 0 for none."""
    early_exit: ExitPolicy | None = None
    """None means early exit is off: exits are not evaluated."""
    decoding_method: DecodingMethod = "auto"
    print_max_prob: bool = False
    """Report each generated token's top probability at every exit evaluated for it."""
    stream: bool = False
    no_log: bool = False
    prompt_ids: tuple[tuple[int, ...], ...] | None = None
    """Each prompt's token ids (BOS not included): set by the service, used by the engine as is."""
    score_prompts: bool = False
    """Also score the prompt tokens by a full forward (echo with logprobs, or Megatron's
    ``tokens_to_generate=0``)."""
    score_exit_depth: int | None = None
    """The exit whose log-probs score the prompt; None for the final head."""

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ValueError("GenerationRequest.prompts must not be empty")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.decoding_method not in DECODING_METHODS:
            raise ValueError(f"decoding_method must be one of {DECODING_METHODS}")


def params_from_generate(request: GenerateRequest) -> GenerationRequest:
    """Map a ``PUT /api`` request onto ``GenerationRequest``."""
    policy = None
    if request.use_early_exit:
        policy = ExitPolicy(
            threshold=request.early_exit_thres,
            measure=request.early_exit_measure,
            depths=request.exit_layers,
        )
    return GenerationRequest(
        prompts=tuple(request.prompts),
        max_new_tokens=request.tokens_to_generate,
        temperature=request.temperature,
        top_k=request.top_k,
        top_p=request.top_p,
        add_bos=request.add_BOS,
        stop_strings=tuple(request.stop_sequences),
        random_seed=request.random_seed,
        echo_prompts=request.echo_prompts,
        return_logprobs=request.logprobs,
        early_exit=policy,
        decoding_method=request.early_exit_method,
        print_max_prob=request.print_max_prob,
        no_log=request.no_log,
        score_prompts=request.tokens_to_generate == 0 and request.logprobs,
        score_exit_depth=request.score_exit_layer,
    )


def params_from_completion(request: CompletionRequest) -> GenerationRequest:
    """Map a ``POST /v1/completions`` request onto ``GenerationRequest``."""
    options = request.early_exit
    policy = None
    if options is not None and options.enabled:
        policy = ExitPolicy(
            threshold=options.threshold, measure=options.measure, depths=options.exit_layers
        )
    return GenerationRequest(
        prompts=tuple(p if isinstance(p, str) else tuple(p) for p in request.prompt),
        max_new_tokens=request.max_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        stop_strings=tuple(request.stop),
        random_seed=request.seed,
        echo_prompts=request.echo,
        return_logprobs=request.logprobs is not None,
        num_top_logprobs=request.logprobs or 0,
        early_exit=policy,
        decoding_method=options.method if options is not None else "auto",
        stream=request.stream,
        score_prompts=request.echo and request.logprobs is not None,
        score_exit_depth=request.score_exit_layer,
    )


# ---------------------------------------------------------------------- parsing and errors


def _validate(model: type[BaseModel], body: Any, limits: ServerLimits | None) -> Any:
    context = {"limits": limits or ServerLimits()}
    if isinstance(body, str | bytes | bytearray):
        return model.model_validate_json(body, context=context)
    return model.model_validate(body, context=context)


def parse_request(model: type[BaseModel], body: Any, limits: ServerLimits | None = None) -> Any:
    """Validate a body (JSON text or decoded object) as ``model`` under ``limits``."""
    return _validate(model, body, limits)


def parse_generate_request(body: Any, limits: ServerLimits | None = None) -> GenerateRequest:
    """Validate a ``PUT /api`` body (JSON text or decoded object) under ``limits``."""
    return _validate(GenerateRequest, body, limits)


def parse_completion_request(body: Any, limits: ServerLimits | None = None) -> CompletionRequest:
    """Validate a ``POST /v1/completions`` body (JSON text or decoded object) under ``limits``."""
    return _validate(CompletionRequest, body, limits)


def check_prompt_tokens(
    prompt_token_counts: Sequence[int], limits: ServerLimits, field: str = "prompts"
) -> None:
    """Raise ``RequestError`` naming ``field.<i>`` if a tokenized prompt exceeds the limit."""
    for index, count in enumerate(prompt_token_counts):
        if count > limits.max_prompt_tokens:
            raise RequestError(
                f"{field}.{index}",
                f"prompt has {count} tokens, at most {limits.max_prompt_tokens} are allowed",
                "too_long",
            )


def _error_field(error: Mapping[str, Any]) -> str | None:
    loc = [str(part) for part in error.get("loc", ())]
    if loc:
        return ".".join(loc)
    return (error.get("ctx") or {}).get("field")


def _error_message(error: Mapping[str, Any], field: str | None) -> str:
    message = error["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    if field and not message.startswith(f"{field}: "):
        message = f"{field}: {message}"
    return message


def error_body(error: ValidationError | RequestError) -> dict[str, dict[str, Any]]:
    """A JSON-able body ``{"error": {"message", "field", "type"}}`` naming the offending field.

    For a ``ValidationError`` the first error is reported (the count of others is appended).
    """
    if isinstance(error, RequestError):
        return {"error": {"message": str(error), "field": error.field, "type": error.error_type}}
    errors = error.errors(include_url=False)
    first = errors[0]
    field = _error_field(first)
    message = _error_message(first, field)
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more error(s))"
    return {"error": {"message": message, "field": field, "type": first["type"]}}
