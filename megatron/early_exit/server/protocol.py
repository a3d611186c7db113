"""Request/response types of the generation server, and their one internal form.

Two transports share one service: the Megatron/EE-LLM style ``PUT /api`` (``GenerateRequest``,
``GenerateResponse``) and the OpenAI style ``POST /v1/completions`` (``CompletionRequest``,
``CompletionResponse``, ``CompletionChunk`` for server-sent events). Both requests map onto the
frozen ``GenerationRequest`` (``params_from_generate``, ``params_from_completion``), the only type
the service layer sees.

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
    """Per-server bounds on a request; the defaults match the original server's 128 prompts."""

    max_prompts: int = 128
    """Most prompts in one request."""
    max_prompt_tokens: int = 4096
    """Most tokens in one prompt (checked after tokenization: ``check_prompt_tokens``)."""
    max_tokens_to_generate: int = 1024
    """Most new tokens per prompt."""

    def __post_init__(self) -> None:
        for name in ("max_prompts", "max_prompt_tokens", "max_tokens_to_generate"):
            if getattr(self, name) < 1:
                raise ValueError(f"ServerLimits.{name} must be >= 1, got {getattr(self, name)}")


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


def _check_prompt_count(prompts: list[str], info: ValidationInfo) -> list[str]:
    max_prompts = _limits(info).max_prompts
    if len(prompts) > max_prompts:
        raise ValueError(f"at most {max_prompts} prompts per request, got {len(prompts)}")
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


def _check_stop_strings(value: list[str]) -> list[str]:
    if any(not stop for stop in value):
        raise ValueError("stop strings must be non-empty")
    return value


_STRICT_NO_EXTRA = ConfigDict(extra="forbid", strict=True)
PromptList = Annotated[
    list[str], BeforeValidator(_as_list), Field(min_length=1), AfterValidator(_check_prompt_count)
]
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
    print_max_prob: bool = Field(False, description="Log each exit's top token and probability.")
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
    def _check_combinations(self) -> GenerateRequest:
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
    request_time: float
    """Wall time of the request in seconds."""


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

    model: str | None = None
    prompt: PromptList = Field(description="One prompt or a list of prompts.")
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

    @field_validator("prompt")
    @classmethod
    def _non_empty_prompts(cls, prompts: list[str]) -> list[str]:
        if any(not prompt for prompt in prompts):
            raise ValueError("prompts must be non-empty strings")
        return prompts

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
    top_logprobs: list[dict[str, float]] | None = None
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


# ------------------------------------------------------------------------------ internal form


@dataclass(frozen=True)
class GenerationRequest:
    """Transport-independent generation settings: what the service layer consumes."""

    prompts: tuple[str, ...]
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
    stream: bool = False
    no_log: bool = False

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
        prompts=tuple(request.prompt),
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
    )


# ---------------------------------------------------------------------- parsing and errors


def _validate(model: type[BaseModel], body: Any, limits: ServerLimits | None) -> Any:
    context = {"limits": limits or ServerLimits()}
    if isinstance(body, str | bytes | bytearray):
        return model.model_validate_json(body, context=context)
    return model.model_validate(body, context=context)


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
