"""OpenAI chat completions: request/response types, chat-template rendering, chunk conversion.

A chat request is rendered to one text prompt with the checkpoint tokenizer's chat template (the
Jinja template Hugging Face tokenizers ship in ``tokenizer_config.json`` or
``chat_template.jinja``, which the HF importer copies with the tokenizer files; a server can
override it with ``--chat-template``), rendered in a sandbox as ``transformers`` does, with
``add_generation_prompt=True``. It then runs as a one-prompt completion; the answers are mapped
onto OpenAI's chat shapes. A checkpoint without a template answers 400 on this route.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, model_validator

from megatron.early_exit.inference.decide import ExitPolicy
from megatron.early_exit.server.protocol import (
    MAX_RANDOM_SEED,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionUsage,
    EarlyExitOptions,
    GenerationRequest,
    NewTokens,
    RequestError,
    ShortText,
    StopStrings,
    StreamOptions,
    _check_request_tokens,
    _field_error,
    _limits,
    check_neutral_fields,
)

_STRICT_NO_EXTRA = ConfigDict(extra="forbid", strict=True)
DEFAULT_CHAT_MAX_TOKENS = 256


class TextPart(BaseModel):
    """A text part of a message's content (the only part type served)."""

    model_config = _STRICT_NO_EXTRA

    type: Literal["text"]
    text: str


def _check_content(value: str | list[TextPart] | None, info: ValidationInfo):
    limit = _limits(info).prompt_chars
    text = value if isinstance(value, str) else "".join(p.text for p in value or ())
    if len(text) > limit:
        raise ValueError(f"at most {limit} characters per message, got {len(text)}")
    return value


class ChatMessage(BaseModel):
    """One message of the conversation."""

    model_config = _STRICT_NO_EXTRA

    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[str | list[TextPart] | None, AfterValidator(_check_content)] = None
    name: ShortText = None

    def as_template_input(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        message = {"role": self.role, "content": content or ""}
        if self.name is not None:
            message["name"] = self.name
        return message


def _check_messages(messages: list[ChatMessage], info: ValidationInfo) -> list[ChatMessage]:
    limit = _limits(info).max_messages
    if len(messages) > limit:
        raise ValueError(f"at most {limit} messages per request, got {len(messages)}")
    return messages


class ChatCompletionRequest(BaseModel):
    """Body of ``POST /v1/chat/completions`` (with the ``early_exit`` extension of
    ``/v1/completions``). ``max_tokens`` (or ``max_completion_tokens``) defaults to
    ``DEFAULT_CHAT_MAX_TOKENS``; ``logprobs: true`` with ``top_logprobs: N`` asks for
    log-probs and alternatives."""

    model_config = _STRICT_NO_EXTRA

    model: ShortText = None
    messages: Annotated[list[ChatMessage], Field(min_length=1), AfterValidator(_check_messages)]
    max_tokens: NewTokens | None = None
    max_completion_tokens: NewTokens | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1)
    stop: StopStrings = Field(default_factory=list)
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=0, le=MAX_RANDOM_SEED)
    logprobs: bool = False
    top_logprobs: int = Field(0, ge=0, le=5)
    early_exit: EarlyExitOptions | None = None
    # Standard fields accepted at their neutral values only.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] = Field(default_factory=dict)
    user: ShortText = None
    response_format: dict[str, str] | None = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _check_work(self, info: ValidationInfo) -> ChatCompletionRequest:
        check_neutral_fields(self)
        if self.response_format not in (None, {"type": "text"}):
            raise _field_error("response_format", 'only {"type": "text"} is supported')
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise _field_error("max_completion_tokens", "give max_tokens or this, not both")
        if self.top_logprobs and not self.logprobs:
            raise _field_error("top_logprobs", "needs logprobs=true")
        _check_request_tokens(1, self.new_tokens(info), info, "max_tokens")
        return self

    def new_tokens(self, info: ValidationInfo | None = None) -> int:
        asked = self.max_tokens if self.max_tokens is not None else self.max_completion_tokens
        if asked is not None:
            return asked
        limit = _limits(info).max_tokens_to_generate if info is not None else None
        return min(DEFAULT_CHAT_MAX_TOKENS, limit or DEFAULT_CHAT_MAX_TOKENS)


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"] | None
    logprobs: ChatLogprobs | None = None
    exit_layers: list[int] | None = None
    """Extension: the exit layer of each generated token."""


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: CompletionUsage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: ChatLogprobs | None = None
    exit_layers: list[int] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    usage: CompletionUsage | None = None


# ------------------------------------------------------------------------------ rendering


def _raise(message: str):
    raise ValueError(message)


def render_chat(template: str, messages: list[dict[str, Any]], tokenizer) -> str:
    """The conversation as one prompt, with the assistant's turn opened.

    Raises ``RequestError`` on ``messages`` if the template rejects them (``raise_exception``)."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    special = {}
    for name, attribute in (("bos_token", "bos"), ("eos_token", "eod")):
        token_id = getattr(tokenizer, attribute, None)
        special[name] = tokenizer.detokenize([token_id]) if token_id is not None else ""
    try:
        return env.from_string(template).render(
            messages=messages, add_generation_prompt=True, **special
        )
    except (TemplateError, ValueError) as error:
        raise RequestError(
            "messages", f"the chat template rejected the messages: {error}"
        ) from None


def params_from_chat(request: ChatCompletionRequest, prompt: str) -> GenerationRequest:
    """Map a rendered chat request onto ``GenerationRequest`` (one prompt)."""
    options = request.early_exit
    policy = None
    if options is not None and options.enabled:
        policy = ExitPolicy(
            threshold=options.threshold, measure=options.measure, depths=options.exit_layers
        )
    return GenerationRequest(
        prompts=(prompt,),
        max_new_tokens=request.new_tokens(),
        temperature=request.temperature,
        top_p=request.top_p,
        stop_strings=tuple(request.stop),
        random_seed=request.seed,
        return_logprobs=request.logprobs,
        num_top_logprobs=request.top_logprobs,
        early_exit=policy,
        decoding_method=options.method if options is not None else "auto",
        stream=request.stream,
    )


# ------------------------------------------------------------------------ response mapping


def _entry(token: str, logprob: float | None) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


def chat_logprobs(logprobs: CompletionLogprobs | None) -> ChatLogprobs | None:
    """Completion logprobs in the chat shape (tokens without a log-prob are left out)."""
    if logprobs is None:
        return None
    content = []
    for position, (token, logprob) in enumerate(zip(logprobs.tokens, logprobs.token_logprobs)):
        if logprob is None:
            continue
        top = (logprobs.top_logprobs or [None] * len(logprobs.tokens))[position] or {}
        content.append(
            ChatTokenLogprob(
                **_entry(token, logprob),
                top_logprobs=[ChatTopLogprob(**_entry(t, lp)) for t, lp in top.items()],
            )
        )
    return ChatLogprobs(content=content)


def chat_choice(choice: CompletionChoice) -> ChatChoice:
    return ChatChoice(
        index=choice.index,
        message=AssistantMessage(content=choice.text),
        finish_reason=choice.finish_reason,
        logprobs=chat_logprobs(choice.logprobs),
        exit_layers=choice.exit_layers,
    )


def chat_chunk_choice(choice: CompletionChoice, first: bool) -> ChatChunkChoice:
    return ChatChunkChoice(
        index=choice.index,
        delta=ChatDelta(role="assistant" if first else None, content=choice.text),
        finish_reason=choice.finish_reason,
        logprobs=chat_logprobs(choice.logprobs),
        exit_layers=choice.exit_layers,
    )


class ChatChunkConverter:
    """Completion chunks of a one-prompt stream as chat chunks (the role in the first delta)."""

    def __init__(self) -> None:
        self._first = True

    def __call__(self, chunk: CompletionChunk) -> ChatCompletionChunk:
        choices = []
        for choice in chunk.choices:
            choices.append(chat_chunk_choice(choice, self._first))
            self._first = False
        return ChatCompletionChunk(
            id=chunk.id.replace("cmpl-", "chatcmpl-", 1),
            created=chunk.created,
            model=chunk.model,
            choices=choices,
            usage=chunk.usage,
        )
