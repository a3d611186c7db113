"""Tokenizers behind one small interface, built from local files only.

Every tokenizer offers ``tokenize(text) -> list[int]``, ``detokenize(ids) -> str``, ``vocab_size``,
``eod``, ``bos`` (``None`` when the vocabulary has none), ``name`` and ``unique_identifiers`` (which
megatron-core's dataset classes hash into their cache keys). None of them defines ``pad``:
megatron-core's ``MegatronDataset`` then uses its own pad id (-1), which never collides with data.

Nothing here downloads anything. Megatron-LM's ``GPT2BPETokenizer`` would fetch its vocabulary
from S3 when no file is given; ours insists on local ``--vocab-file`` / ``--merge-file`` paths.
"""

from __future__ import annotations

import json
import os
import re
import sys
import unicodedata
from collections import OrderedDict
from collections.abc import Iterable
from functools import lru_cache

TOKENIZER_TYPES = (
    "ByteLevelTokenizer",
    "NullTokenizer",
    "GPT2BPETokenizer",
    "SentencePieceTokenizer",
    "Llama2Tokenizer",
    "HuggingFaceTokenizer",
)


class _TokenizerBase:
    """Shared bookkeeping: a name and the identifiers megatron-core hashes into cache keys."""

    name: str = ""
    bos: int | None = None

    def __init__(self, **identifiers: object) -> None:
        self.unique_identifiers = OrderedDict(
            [("class", type(self).__name__)] + [(k, str(v)) for k, v in identifiers.items()]
        )

    def __repr__(self) -> str:
        return f"{self.name}(vocab_size={self.vocab_size}, eod={self.eod})"


class ByteLevelTokenizer(_TokenizerBase):
    """UTF-8 bytes as ids 0..255 plus an end-of-document id 256 (vocabulary 257).

    Round-trips any text. ``detokenize`` drops the EOD id and replaces invalid UTF-8 (which an
    arbitrary id sequence may form) with U+FFFD.
    """

    name = "ByteLevelTokenizer"

    def __init__(self) -> None:
        super().__init__()
        self.vocab_size = 257
        self.eod = 256

    def tokenize(self, text: str) -> list[int]:
        """Returns the UTF-8 bytes of ``text``."""
        return list(text.encode("utf-8"))

    def detokenize(self, ids: Iterable[int]) -> str:
        """Decodes byte ids, skipping ids >= 256."""
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class NullTokenizer(_TokenizerBase):
    """megatron-core's NullTokenizer: the text is already whitespace-separated integer ids.

    As in ``megatron.core.tokenizers.text.libraries.null_tokenizer``, ``--vocab-size V`` counts
    the ids without EOD: ``eod == V`` and ``vocab_size == V + 1``.
    """

    name = "NullTokenizer"

    def __init__(self, vocab_size: int) -> None:
        super().__init__(vocab_size=vocab_size)
        self.eod = int(vocab_size)
        self.vocab_size = int(vocab_size) + 1

    def tokenize(self, text: str) -> list[int]:
        """Parses whitespace-separated integers."""
        return [int(x) for x in text.split()]

    def detokenize(self, ids: Iterable[int]) -> str:
        """Joins the ids with single spaces."""
        return " ".join(str(int(i)) for i in ids)


# --- GPT-2 byte-level BPE

# Unicode White_Space, the set GPT-2's `regex` pattern means by \s.
_WHITE_SPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"


def _category_class(major: str) -> str:
    """A character-class body listing every code point whose Unicode category starts with
    ``major`` ('L' or 'N'), as ranges. Emulates the `regex` package's \\p{L} / \\p{N} with the
    standard library, so the GPT-2 tokenizer needs no extra dependency."""
    ranges: list[list[int]] = []
    for cp in range(sys.maxunicode + 1):
        if unicodedata.category(chr(cp))[0] == major:
            if ranges and ranges[-1][1] == cp - 1:
                ranges[-1][1] = cp
            else:
                ranges.append([cp, cp])
    return "".join(
        re.escape(chr(a)) if a == b else f"{re.escape(chr(a))}-{re.escape(chr(b))}"
        for a, b in ranges
    )


@lru_cache(maxsize=1)
def gpt2_pretokenizer() -> re.Pattern:
    """GPT-2's split pattern ``'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|
    \\s+(?!\\S)|\\s+`` translated to the standard ``re`` module (built once, about 0.3 s).

    Checked against the `regex` package on every code point: the splits agree except on code
    points that Python's Unicode database (14.0 in Python 3.11) does not assign yet.
    """
    letters, numbers, space = _category_class("L"), _category_class("N"), _WHITE_SPACE
    return re.compile(
        rf"'s|'t|'re|'ve|'m|'ll|'d| ?[{letters}]+| ?[{numbers}]+| ?[^{space}{letters}{numbers}]+"
        rf"|[{space}]+(?![^{space}])|[{space}]+"
    )


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


class GPT2BPETokenizer(_TokenizerBase):
    """OpenAI's GPT-2 byte-level BPE from ``encoder.json`` (vocab) and ``vocab.bpe`` (merges).

    A compact pure-Python implementation of the reference algorithm; ids equal OpenAI's, e.g.
    "Hello world" -> [15496, 995]. EOD is ``<|endoftext|>`` (50256); there is no separate BOS.
    """

    name = "GPT2BPETokenizer"
    _CACHE_LIMIT = 200_000

    def __init__(self, vocab_file: str, merge_file: str) -> None:
        super().__init__(vocab_file=vocab_file, merge_file=merge_file)
        with open(vocab_file, encoding="utf-8") as f:
            self._encoder: dict[str, int] = json.load(f)
        self._decoder = {v: k for k, v in self._encoder.items()}
        with open(merge_file, encoding="utf-8") as f:
            lines = [line for line in f.read().split("\n") if line and not line.startswith("#")]
        self._ranks = {tuple(line.split()): i for i, line in enumerate(lines)}
        self._byte_encoder = _bytes_to_unicode()
        self._byte_decoder = {c: b for b, c in self._byte_encoder.items()}
        self._pattern = gpt2_pretokenizer()
        self._cache: dict[str, list[int]] = {}
        self.vocab_size = len(self._encoder)
        self.eod = self._encoder["<|endoftext|>"]

    def _bpe(self, word: str) -> list[str]:
        """Applies the merges to one pre-token (already mapped to printable characters): merge the
        lowest-ranked adjacent pair everywhere, repeat until no pair has a rank."""
        parts = list(word)
        while len(parts) > 1:
            pair = min(zip(parts, parts[1:]), key=lambda p: self._ranks.get(p, sys.maxsize))
            if pair not in self._ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    def _encode_pretoken(self, piece: str) -> list[int]:
        """Ids of one pre-token, memoised."""
        ids = self._cache.get(piece)
        if ids is None:
            word = "".join(self._byte_encoder[b] for b in piece.encode("utf-8"))
            ids = [self._encoder[t] for t in self._bpe(word)]
            if len(self._cache) >= self._CACHE_LIMIT:
                self._cache.clear()
            self._cache[piece] = ids
        return ids

    def tokenize(self, text: str) -> list[int]:
        """Splits with GPT-2's pattern, then applies byte-level BPE to each piece."""
        ids: list[int] = []
        for piece in self._pattern.findall(text):
            ids.extend(self._encode_pretoken(piece))
        return ids

    def detokenize(self, ids: Iterable[int]) -> str:
        """Inverse of ``tokenize`` (``<|endoftext|>`` comes back as its literal text)."""
        chars = "".join(self._decoder[int(i)] for i in ids)
        return bytes(self._byte_decoder[c] for c in chars).decode("utf-8", errors="replace")


# --- SentencePiece and Hugging Face


class SentencePieceTokenizer(_TokenizerBase):
    """A SentencePiece ``.model``: EOD is the model's ``</s>`` (eos) id and BOS its ``<s>`` id.

    These are the semantics of Megatron-LM's ``GPTSentencePieceTokenizer`` / ``Llama2Tokenizer``
    (Megatron's older ``SentencePieceTokenizer`` appended extra ``<EOD>`` pieces instead).
    """

    name = "SentencePieceTokenizer"

    def __init__(self, model_file: str) -> None:
        import sentencepiece

        super().__init__(tokenizer_model=model_file)
        self._model_file = model_file
        self._sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
        self.vocab_size = self._sp.get_piece_size()
        if self._sp.eos_id() < 0:
            raise ValueError(f"--tokenizer-model {model_file} defines no </s> piece to use as EOD")
        self.eod = self._sp.eos_id()
        self.bos = self._sp.bos_id() if self._sp.bos_id() >= 0 else None

    def tokenize(self, text: str) -> list[int]:
        """Encodes without adding BOS/EOS (the preprocessing step appends EOD)."""
        return self._sp.encode(text)

    def detokenize(self, ids: Iterable[int]) -> str:
        """Decodes; control pieces such as ``</s>`` decode to nothing."""
        return self._sp.decode([int(i) for i in ids])

    def __getstate__(self) -> dict:
        return {"model_file": self._model_file}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["model_file"])


class Llama2Tokenizer(SentencePieceTokenizer):
    """Megatron-LM's ``Llama2Tokenizer``: a SentencePiece model (Llama 2's ``tokenizer.model``)
    whose ``tokenize`` starts every text with BOS, as Megatron's does (``bos=True``), so data
    preprocessed with it matches Megatron-LM's. EOD is ``</s>``."""

    name = "Llama2Tokenizer"

    def tokenize(self, text: str) -> list[int]:
        """BOS, then the text's pieces (no EOS: the preprocessing step appends EOD)."""
        ids = self._sp.encode(text)
        return ids if self.bos is None else [self.bos, *ids]


def _load_hf_backend(directory: str):
    """Returns (encode, decode, vocab_size, eos_id, bos_id) from transformers or tokenizers."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        AutoTokenizer = None
    if AutoTokenizer is not None:
        tok = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        return (
            lambda text: tok.encode(text, add_special_tokens=False),
            lambda ids: tok.decode(ids),
            len(tok),
            tok.eos_token_id,
            tok.bos_token_id,
        )
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ImportError(
            "HuggingFaceTokenizer needs the 'transformers' or the 'tokenizers' package "
            "(pip install 'ee-llm[hf]')"
        ) from None
    path = os.path.join(directory, "tokenizer.json")
    if not os.path.isfile(path):
        raise ValueError(f"--tokenizer-model {directory} has no tokenizer.json")
    tok = Tokenizer.from_file(path)
    eos, bos = _special_ids_from_config(directory, tok.token_to_id)
    return (
        lambda text: tok.encode(text, add_special_tokens=False).ids,
        lambda ids: tok.decode(ids, skip_special_tokens=False),
        tok.get_vocab_size(with_added_tokens=True),
        eos,
        bos,
    )


def _special_ids_from_config(directory: str, token_to_id) -> tuple[int | None, int | None]:
    """Reads eos/bos token names from ``tokenizer_config.json`` when present, else guesses the
    usual names; returns their ids."""
    names: dict[str, object] = {}
    config_path = os.path.join(directory, "tokenizer_config.json")
    if os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as f:
            names = json.load(f)

    def lookup(key: str, fallbacks: tuple[str, ...]) -> int | None:
        value = names.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        for candidate in ((value,) if value else ()) + fallbacks:
            token_id = token_to_id(candidate)
            if token_id is not None:
                return token_id
        return None

    eos = lookup("eos_token", ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>"))
    bos = lookup("bos_token", ("<s>", "<bos>", "<|begin_of_text|>"))
    return eos, bos


def read_chat_template(directory: str) -> str | None:
    """The chat template a Hugging Face tokenizer directory ships, or None."""
    path = os.path.join(directory, "chat_template.jinja")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    config_path = os.path.join(directory, "tokenizer_config.json")
    if not os.path.isfile(config_path):
        return None
    with open(config_path, encoding="utf-8") as f:
        template = json.load(f).get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template else None


class HuggingFaceTokenizer(_TokenizerBase):
    """A Hugging Face tokenizer saved in a local directory (never fetched from a hub).

    Uses ``transformers.AutoTokenizer`` when installed, else ``tokenizers.Tokenizer`` on the
    directory's ``tokenizer.json``. EOD is the tokenizer's eos token.
    """

    name = "HuggingFaceTokenizer"

    def __init__(self, directory: str) -> None:
        super().__init__(tokenizer_model=directory)
        self._directory = directory
        self._encode, self._decode, self.vocab_size, eos, self.bos = _load_hf_backend(directory)
        if eos is None:
            raise ValueError(f"--tokenizer-model {directory} defines no eos token to use as EOD")
        self.eod = eos

    @property
    def chat_template(self) -> str | None:
        """The directory's chat template (``chat_template.jinja``, else ``tokenizer_config.json``'s
        ``chat_template``, the ``default`` one of a named list); None when it has none."""
        return read_chat_template(self._directory)

    def tokenize(self, text: str) -> list[int]:
        """Encodes without special tokens."""
        return list(self._encode(text))

    def detokenize(self, ids: Iterable[int]) -> str:
        """Decodes, keeping special tokens as text."""
        return self._decode([int(i) for i in ids])

    def __getstate__(self) -> dict:
        return {"directory": self._directory}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["directory"])


# --- factory


def _require_file(path: str | None, flag: str, tokenizer_type: str) -> str:
    """Checks that a flag was given and names an existing file."""
    if not path:
        raise ValueError(f"{flag} is required for {tokenizer_type}")
    if not os.path.isfile(path):
        raise ValueError(f"{flag} {path}: no such file")
    return path


def build_tokenizer(
    tokenizer_type: str,
    *,
    vocab_file: str | None = None,
    merge_file: str | None = None,
    tokenizer_model: str | None = None,
    vocab_size: int | None = None,
):
    """Builds a tokenizer from Megatron-style flags; raises ValueError naming the bad flag."""
    if tokenizer_type == "ByteLevelTokenizer":
        return ByteLevelTokenizer()
    if tokenizer_type == "NullTokenizer":
        if vocab_size is None or int(vocab_size) <= 0:
            raise ValueError("--vocab-size (a positive integer) is required for NullTokenizer")
        return NullTokenizer(int(vocab_size))
    if tokenizer_type == "GPT2BPETokenizer":
        vocab = _require_file(vocab_file, "--vocab-file", tokenizer_type)
        merges = _require_file(merge_file, "--merge-file", tokenizer_type)
        return GPT2BPETokenizer(vocab, merges)
    if tokenizer_type in ("SentencePieceTokenizer", "Llama2Tokenizer"):
        cls = Llama2Tokenizer if tokenizer_type == "Llama2Tokenizer" else SentencePieceTokenizer
        return cls(_require_file(tokenizer_model, "--tokenizer-model", tokenizer_type))
    if tokenizer_type == "HuggingFaceTokenizer":
        if not tokenizer_model:
            raise ValueError(f"--tokenizer-model is required for {tokenizer_type}")
        if not os.path.isdir(tokenizer_model):
            raise ValueError(
                f"--tokenizer-model {tokenizer_model}: not a local directory "
                "(tokenizers are never downloaded from a hub)"
            )
        return HuggingFaceTokenizer(tokenizer_model)
    raise ValueError(
        f"--tokenizer-type {tokenizer_type!r} is not supported; choose one of "
        + ", ".join(TOKENIZER_TYPES)
    )


def checkpoint_tokenizer(info, tokenizer_model: str | None = None):
    """The tokenizer a checkpoint records (``CheckpointInfo.model_args["tokenizer"]``);
    ``tokenizer_model`` overrides the recorded model file or directory. ValueError when the
    checkpoint records none."""
    recorded = dict(info.model_args.get("tokenizer") or {})
    if tokenizer_model:
        recorded["tokenizer_model"] = tokenizer_model
    kind = recorded.pop("tokenizer_type", None)
    if not kind:
        raise ValueError("the checkpoint records no tokenizer; pass --tokenizer-model")
    return build_tokenizer(kind, **{k: v for k, v in recorded.items() if v is not None})
