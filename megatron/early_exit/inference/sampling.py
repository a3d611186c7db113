"""Token sampling, stop detection and the speculative-decoding acceptance rule.

All functions are model-independent and work on the current position of each row:
``logits[b, V]``. Sampling settings may differ per row (a scalar, or a tensor of shape ``[b]``).

Semantics (EE-LLM / Megatron conventions):

* ``temperature == 0`` is greedy (argmax of the raw logits); top-k/top-p are then irrelevant.
* ``top_k == 0`` disables top-k; ``top_k >= V`` keeps everything.
* ``top_p == 0`` disables top-p (Megatron convention); ``top_p >= 1`` keeps everything. Otherwise
  the smallest set of most-likely tokens whose probability reaches ``top_p`` is kept.
* Top-k is applied before top-p, both on the tempered logits, in float32.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch

Setting = float | int | torch.Tensor


def _check_logits(logits: torch.Tensor) -> None:
    if logits.dim() != 2 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have shape [batch, vocab], got {tuple(logits.shape)}")


def _row_setting(
    value: Setting, name: str, batch_size: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """A per-row setting as a ``[b]`` tensor, broadcasting scalars."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if isinstance(value, torch.Tensor):
        if value.dim() not in (0, 1) or (value.dim() == 1 and value.shape[0] != batch_size):
            raise ValueError(f"{name} must be a scalar or have shape [{batch_size}]")
        if dtype == torch.long and value.is_floating_point():
            raise ValueError(f"{name} must hold integers, got dtype {value.dtype}")
        return value.to(device=device, dtype=dtype).expand(batch_size)
    if dtype == torch.long and not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number or a tensor, got {type(value).__name__}")
    return torch.full((batch_size,), value, dtype=dtype, device=device)


def _sampling_settings(
    logits: torch.Tensor, temperature: Setting, top_k: Setting, top_p: Setting
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validated ``[b]`` tensors for temperature, top_k, top_p."""
    batch_size, device = logits.shape[0], logits.device
    temperature = _row_setting(temperature, "temperature", batch_size, torch.float32, device)
    top_k = _row_setting(top_k, "top_k", batch_size, torch.long, device)
    top_p = _row_setting(top_p, "top_p", batch_size, torch.float32, device)
    if not bool(torch.isfinite(temperature).all()) or bool((temperature < 0).any()):
        raise ValueError(f"temperature must be finite and >= 0, got {temperature.tolist()}")
    if bool((top_k < 0).any()):
        raise ValueError(f"top_k must be >= 0 (0 disables it), got {top_k.tolist()}")
    if not bool(((top_p >= 0) & (top_p <= 1)).all()):
        raise ValueError(f"top_p must be in [0, 1] (0 disables it), got {top_p.tolist()}")
    return temperature, top_k, top_p


def _filter_mask(sorted_logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor):
    """Tokens to drop, in sorted (descending) order: ``[b, V]`` bool."""
    vocab_size = sorted_logits.shape[-1]
    ranks = torch.arange(vocab_size, device=sorted_logits.device)
    drop = (top_k > 0).unsqueeze(-1) & (ranks.unsqueeze(0) >= top_k.unsqueeze(-1))
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the strictly better tokens
    use_top_p = ((top_p > 0) & (top_p < 1)).unsqueeze(-1)
    return drop | (use_top_p & (mass_before >= top_p.unsqueeze(-1)))


def sampling_logprobs(
    logits: torch.Tensor, temperature: Setting = 0.0, top_k: Setting = 0, top_p: Setting = 0.0
) -> torch.Tensor:
    """Log-probabilities ``[b, V]`` (float32) of the distribution ``sample`` draws from.

    Tempered, top-k/top-p filtered (``-inf`` outside the kept set) and renormalised. Greedy rows
    (temperature 0) are one-hot on the argmax: 0 there, ``-inf`` elsewhere.
    """
    _check_logits(logits)
    temperature, top_k, top_p = _sampling_settings(logits, temperature, top_k, top_p)
    logits = logits.float()
    greedy = temperature == 0
    tempered = logits / torch.where(greedy, 1.0, temperature).unsqueeze(-1)
    sorted_logits, order = tempered.sort(dim=-1, descending=True)
    drop = torch.zeros_like(sorted_logits, dtype=torch.bool)
    drop.scatter_(-1, order, _filter_mask(sorted_logits, top_k, top_p))
    sampled = torch.log_softmax(tempered.masked_fill(drop, float("-inf")), dim=-1)
    one_hot = torch.full_like(logits, float("-inf"))
    one_hot.scatter_(-1, logits.argmax(dim=-1, keepdim=True), 0.0)
    return torch.where(greedy.unsqueeze(-1), one_hot, sampled)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Model log-probability (log-softmax of the raw logits, float32) of ``tokens[b]``: ``[b]``."""
    _check_logits(logits)
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return log_probs.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)


def sample(
    logits: torch.Tensor,
    temperature: Setting = 0.0,
    top_k: Setting = 0,
    top_p: Setting = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row: ``logits[b, V] -> (tokens LongTensor[b], logprobs float32[b])``.

    The reported log-prob of a sampled row is that of the chosen token under the distribution it
    was drawn from (tempered, filtered, renormalised: ``sampling_logprobs``). For a greedy row
    (temperature 0) that distribution is a point mass, so the model's log-prob (log-softmax of the
    untempered, unfiltered logits) is reported instead; both coincide at temperature 1 without
    filtering. ``generator`` (on the logits' device) makes sampling reproducible.
    """
    log_probs = sampling_logprobs(logits, temperature, top_k, top_p)  # [b, V]
    tokens = torch.multinomial(log_probs.exp(), 1, generator=generator).squeeze(-1)
    sampled_lp = log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    greedy = _row_setting(temperature, "temperature", logits.shape[0], torch.float32, logits.device)
    model_lp = token_logprobs(logits, tokens)
    return tokens, torch.where(greedy == 0, model_lp, sampled_lp)


# ----------------------------------------------------------------------------- stop detection


def find_stop_string(text: str, stop_strings: Sequence[str], start: int = 0) -> int | None:
    """Character index of the earliest stop string in ``text`` beginning at or after ``start``."""
    hits = [text.find(stop, start) for stop in stop_strings]
    hits = [hit for hit in hits if hit >= 0]
    return min(hits) if hits else None


class StopChecker:
    """Per-row stop detection over one generation: EOS token ids and stop *strings*.

    Call ``update`` once per generated token with the new tokens and each row's detokenized
    generated text so far (the new token included; prompt excluded). Stop strings are matched on
    text, so they may span several tokens. When a row stops:

    * ``truncate_at[i]``: character index at which to cut the generated text (the start of the stop
      string, or the text length before the EOS token; neither is included in the output).
    * ``num_tokens[i]``: generated tokens to keep (the EOS token is dropped; the token that
      completed a stop string is kept, only its text is cut).
    * ``reason[i]``: ``"eos"`` or ``"stop"``.

    Texts are assumed prefix-stable (earlier characters do not change as tokens are appended).
    """

    def __init__(
        self, batch_size: int, eos_token_ids: Iterable[int] = (), stop_strings: Sequence[str] = ()
    ) -> None:
        if any(not stop for stop in stop_strings):
            raise ValueError("stop_strings must not contain empty strings")
        self.eos_token_ids = torch.tensor(sorted(set(eos_token_ids)), dtype=torch.long)
        self.stop_strings = tuple(stop_strings)
        self.finished = torch.zeros(batch_size, dtype=torch.bool)
        self.truncate_at: list[int | None] = [None] * batch_size
        self.num_tokens: list[int | None] = [None] * batch_size
        self.reason: list[str | None] = [None] * batch_size
        self._text_lengths = [0] * batch_size
        self._num_steps = 0

    def update(self, new_tokens: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """Record one step; returns the ``finished`` flags ``BoolTensor[b]`` (CPU)."""
        batch_size = self.finished.shape[0]
        if new_tokens.shape != (batch_size,) or len(texts) != batch_size:
            raise ValueError(f"update expects {batch_size} new tokens and {batch_size} texts")
        if not self.stop_strings and not len(self.eos_token_ids):  # nothing can stop a row
            self._num_steps += 1
            return self.finished.clone()
        is_eos = torch.isin(new_tokens.cpu().long(), self.eos_token_ids)
        for row in range(batch_size):
            if not self.finished[row]:
                self._update_row(row, bool(is_eos[row]), texts[row])
        self._num_steps += 1
        return self.finished.clone()

    def _update_row(self, row: int, is_eos: bool, text: str) -> None:
        if is_eos:
            self._finish(row, "eos", self._text_lengths[row], self._num_steps)
            return
        longest = max((len(stop) for stop in self.stop_strings), default=0)
        start = max(0, self._text_lengths[row] - longest + 1)
        hit = find_stop_string(text, self.stop_strings, start)
        if hit is not None:
            self._finish(row, "stop", hit, self._num_steps + 1)
        self._text_lengths[row] = len(text)

    def _finish(self, row: int, reason: str, truncate_at: int, num_tokens: int) -> None:
        self.finished[row] = True
        self.reason[row] = reason
        self.truncate_at[row] = truncate_at
        self.num_tokens[row] = num_tokens


# ----------------------------------------------------------------------- speculative decoding


class Verification(NamedTuple):
    """Outcome of verifying ``k`` draft tokens per row."""

    num_accepted: torch.Tensor
    """``LongTensor[b]`` in ``[0, k]``: the accepted draft prefix length."""
    next_tokens: torch.Tensor
    """``LongTensor[b]``: the token after the accepted prefix (a correction, or a bonus token)."""


def _check_draft(draft_tokens: torch.Tensor, target: torch.Tensor, name: str) -> None:
    if draft_tokens.dim() != 2:
        raise ValueError(f"draft_tokens must have shape [b, k], got {tuple(draft_tokens.shape)}")
    batch_size, num_draft = draft_tokens.shape
    if target.dim() != 3 or target.shape[:2] != (batch_size, num_draft + 1):
        raise ValueError(
            f"{name} must have shape [{batch_size}, {num_draft + 1}, V], got {tuple(target.shape)}"
        )


def _accepted_prefix(accept: torch.Tensor) -> torch.Tensor:
    """Length of the leading run of True per row: ``[b, k] -> [b]``."""
    return accept.long().cumprod(dim=-1).sum(dim=-1)


def greedy_verify(draft_tokens: torch.Tensor, target_logits: torch.Tensor) -> Verification:
    """Greedy verification: accept the longest draft prefix that agrees with the target's argmax.

    ``draft_tokens[b, k]``; ``target_logits[b, k + 1, V]`` where position ``i`` predicts the token
    after draft token ``i - 1`` (position ``k`` gives the bonus token when all drafts agree).
    """
    _check_draft(draft_tokens, target_logits, "target_logits")
    target_tokens = target_logits.argmax(dim=-1)  # [b, k + 1]
    num_accepted = _accepted_prefix(draft_tokens == target_tokens[:, :-1])
    next_tokens = target_tokens.gather(-1, num_accepted.unsqueeze(-1)).squeeze(-1)
    return Verification(num_accepted, next_tokens)


def speculative_accept(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    generator: torch.Generator | None = None,
) -> Verification:
    """Lossless speculative-sampling acceptance (Leviathan et al., Chen et al., 2023).

    Draft token ``i`` is accepted with probability ``min(1, p_i(x) / q_i(x))``; at the first
    rejection the next token is drawn from ``norm(max(0, p_i - q_i))``; if all ``k`` are accepted a
    bonus token is drawn from ``p_k``. The emitted tokens then follow the target distribution.

    Args:
        draft_tokens: ``LongTensor[b, k]``, drawn from ``draft_probs``.
        draft_probs: ``[b, k, V]`` probabilities ``q`` the drafts were sampled from.
        target_probs: ``[b, k + 1, V]`` target probabilities ``p`` (same sampling settings, e.g.
            ``sampling_logprobs(...).exp()``, for the output to follow the processed target).
    """
    _check_draft(draft_tokens, target_probs, "target_probs")
    if draft_probs.shape != (*draft_tokens.shape, target_probs.shape[-1]):
        raise ValueError(f"draft_probs must have shape [b, k, V], got {tuple(draft_probs.shape)}")
    p, q = target_probs.float(), draft_probs.float()
    index = draft_tokens.long().unsqueeze(-1)
    p_draft = p[:, :-1].gather(-1, index).squeeze(-1)  # [b, k]
    q_draft = q.gather(-1, index).squeeze(-1)
    uniform = torch.rand(p_draft.shape, generator=generator, device=p.device)
    num_accepted = _accepted_prefix(uniform * q_draft < p_draft)
    return Verification(num_accepted, _resample(p, q, num_accepted, generator))


def _resample(
    p: torch.Tensor, q: torch.Tensor, num_accepted: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """Draw from ``norm(max(0, p - q))`` at the rejected position, or from ``p_k`` if none."""
    num_draft = q.shape[1]
    q_padded = torch.cat([q, torch.zeros_like(q[:, :1])], dim=1)  # [b, k + 1, V]: q_k = 0
    position = num_accepted.view(-1, 1, 1).expand(-1, 1, p.shape[-1])
    p_at = p.gather(1, position).squeeze(1)  # [b, V]
    residual = (p_at - q_padded.gather(1, position).squeeze(1)).clamp(min=0)
    # p == q at the rejected position can only be reached through rounding: fall back to p.
    empty = residual.sum(dim=-1, keepdim=True) <= 0
    residual = torch.where(empty | (num_accepted == num_draft).unsqueeze(-1), p_at, residual)
    return torch.multinomial(residual, 1, generator=generator).squeeze(-1)
