"""Text utilities of the server: incremental detokenization and stop-string hold-back."""

from __future__ import annotations

from collections.abc import Sequence

from megatron.early_exit.server.generator import Tokenizer

_REPLACEMENT = "\ufffd"
_WINDOW = 8
"""Tokens of context re-decoded with each new token (enough for any UTF-8 character's bytes and a
tokenizer's merge-dependent spacing)."""


def token_pieces(tokenizer: Tokenizer, ids: Sequence[int]) -> list[str]:
    """The text each token adds, such that ``"".join(pieces) == tokenizer.detokenize(ids)``.

    Detokenizing each token alone garbles non-ASCII text (a character's UTF-8 bytes may span
    tokens); re-detokenizing the whole prefix per token costs O(n^2). Here each token is decoded
    with a short window of the tokens before it: a piece that ends inside a character (the
    replacement character) is held back and released, whole, with the token that completes it.
    The last piece absorbs whatever the window decoding missed, so the joined pieces always equal
    the full decode.
    """
    pieces: list[str] = []
    emitted = 0  # tokens whose text is in ``pieces``
    start = 0  # window start
    for end in range(1, len(ids) + 1):
        window_text = tokenizer.detokenize(ids[start:end])
        emitted_text = tokenizer.detokenize(ids[start:emitted]) if emitted > start else ""
        if window_text.endswith(_REPLACEMENT) or not window_text.startswith(emitted_text):
            pieces.append("")
            continue
        pieces.append(window_text[len(emitted_text) :])
        emitted = end
        start = max(start, end - _WINDOW)
    if "".join(pieces) != tokenizer.detokenize(ids):  # the window missed context (rare)
        return _prefix_pieces(tokenizer, ids)
    return pieces


def grown_text(
    tokenizer: Tokenizer, ids: Sequence[int], previous: str, *, last: bool = False
) -> str | None:
    """The decoded text of ``ids`` if it extends ``previous`` (the text released so far) and
    does not end inside a character (unless ``last``); else None: release nothing yet. Used
    token by token when streaming, and by the exact fallback of :func:`token_pieces`."""
    text = tokenizer.detokenize(ids)
    if text.startswith(previous) and not (text.endswith(_REPLACEMENT) and not last):
        return text
    return None


def _prefix_pieces(tokenizer: Tokenizer, ids: Sequence[int]) -> list[str]:
    """Pieces by re-decoding every prefix (the exact, O(n^2) fallback of ``token_pieces``): a
    prefix whose text does not extend the text so far contributes nothing until one does."""
    pieces, previous = [], ""
    for count in range(1, len(ids) + 1):
        text = grown_text(tokenizer, ids[:count], previous, last=count == len(ids))
        if text is not None:
            pieces.append(text[len(previous) :])
            previous = text
        else:
            pieces.append("")
    if "".join(pieces) != tokenizer.detokenize(ids):
        pieces = [""] * (len(ids) - 1) + [tokenizer.detokenize(ids)]
    return pieces


def stop_holdback(text: str, stop_strings: Sequence[str]) -> int:
    """Characters at the end of ``text`` that could be the start of a stop string."""
    longest = 0
    for stop in stop_strings:
        for length in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:length]):
                longest = length
                break
    return longest
