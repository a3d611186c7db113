"""JSONL -> Megatron ``.bin``/``.idx`` (megatron-core's ``IndexedDatasetBuilder``).

The output matches Megatron-LM's ``tools/preprocess_data.py`` without ``--split-sentences``: for
each JSON key, ``<output_prefix>_<key>_document.bin/.idx`` holding one sequence per document (none
for an empty document), EOD appended with ``append_eod``, token dtype uint16 below 65,500 ids.

Worker processes each build the tokenizer once (pool initializer) and tokenize lines; the parent
writes results in input order, so any worker count gives byte-identical files. Outputs are written
under temporary names and renamed at the end: a failed run leaves no half-written dataset.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from megatron.early_exit.data.tokenizers import build_tokenizer

MAX_REPORTED_LINES = 20


class MalformedInputError(ValueError):
    """Input lines that are not a JSON object with a string under every requested key."""

    def __init__(self, path: str, problems: list[tuple[int, str]]) -> None:
        self.path = path
        self.problems = problems
        super().__init__(
            f"{path}: {describe_malformed(problems)}\n"
            "(pass --skip-malformed to skip these lines instead)"
        )


def describe_malformed(problems: Sequence[tuple[int, str]]) -> str:
    """'N malformed line(s):' plus up to MAX_REPORTED_LINES 'line L: reason' entries."""
    lines = [f"{len(problems)} malformed line(s):"]
    lines += [f"  line {number}: {reason}" for number, reason in problems[:MAX_REPORTED_LINES]]
    if len(problems) > MAX_REPORTED_LINES:
        lines.append(f"  ... and {len(problems) - MAX_REPORTED_LINES} more")
    return "\n".join(lines)


@dataclass
class PreprocessResult:
    """What ``preprocess_jsonl`` wrote: one dataset prefix per JSON key, and what it skipped."""

    output_prefixes: dict[str, str]
    num_documents: int = 0
    num_tokens: int = 0
    malformed: list[tuple[int, str]] = field(default_factory=list)


class _LineEncoder:
    """Turns one numbered JSONL line into token ids per key, or a reason it is malformed."""

    def __init__(self, tokenizer_kwargs: dict, json_keys: Sequence[str], append_eod: bool) -> None:
        self.tokenizer = build_tokenizer(**tokenizer_kwargs)
        self.json_keys = tuple(json_keys)
        self.append_eod = append_eod

    def _parse(self, raw: bytes) -> dict[str, str] | str:
        """The requested fields, or a string saying what is wrong with the line."""
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as err:
            return f"invalid UTF-8 at byte {err.start}"
        except json.JSONDecodeError as err:
            return f"invalid JSON ({err.msg} at column {err.colno})"
        if not isinstance(record, dict):
            return f"expected a JSON object, got {type(record).__name__}"
        fields = {}
        for key in self.json_keys:
            if key not in record:
                return f"missing key {key!r}"
            if not isinstance(record[key], str):
                return f"{key!r} is {type(record[key]).__name__}, not a string"
            fields[key] = record[key]
        return fields

    def __call__(self, item: tuple[int, bytes]) -> tuple[int, dict[str, list[int]] | str, int]:
        """Returns (line number, ids per key or the malformed reason, bytes consumed)."""
        number, raw = item
        fields = self._parse(raw)
        if isinstance(fields, str):
            return number, fields, len(raw)
        encoded = {}
        for key, text in fields.items():
            ids = self.tokenizer.tokenize(text)
            if ids and self.append_eod:
                ids.append(self.tokenizer.eod)
            encoded[key] = ids
        return number, encoded, len(raw)


_WORKER_ENCODER: _LineEncoder | None = None


def _init_worker(tokenizer_kwargs: dict, json_keys: Sequence[str], append_eod: bool) -> None:
    """Pool initializer: builds the tokenizer once per worker process."""
    global _WORKER_ENCODER
    _WORKER_ENCODER = _LineEncoder(tokenizer_kwargs, json_keys, append_eod)


def _encode_in_worker(item: tuple[int, bytes]):
    """Pool task: encodes one line with this worker's encoder."""
    return _WORKER_ENCODER(item)


def _numbered_lines(path: str) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw line) for every non-blank line; workers decode them."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if raw.strip():
                yield number, raw


def _encoded_lines(path, tokenizer_kwargs, json_keys, append_eod, workers, chunksize) -> Iterator:
    """Encoded lines in input order, from a process pool or (workers == 1) in-process."""
    if workers <= 1:
        encoder = _LineEncoder(tokenizer_kwargs, json_keys, append_eod)
        yield from map(encoder, _numbered_lines(path))
        return
    with multiprocessing.Pool(
        workers, initializer=_init_worker, initargs=(tokenizer_kwargs, json_keys, append_eod)
    ) as pool:
        yield from pool.imap(_encode_in_worker, _numbered_lines(path), chunksize)


class _DatasetWriters:
    """One ``IndexedDatasetBuilder`` per key, writing under temporary names until ``commit``."""

    def __init__(self, output_prefixes: dict[str, str], vocab_size: int) -> None:
        # Imported here so that worker processes, which only tokenize, start without torch.
        from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

        self.output_prefixes = output_prefixes
        dtype = DType.optimal_dtype(vocab_size)
        self.builders = {
            key: IndexedDatasetBuilder(prefix + ".bin.tmp", dtype=dtype)
            for key, prefix in output_prefixes.items()
        }

    def add(self, encoded: dict[str, list[int]]) -> None:
        """Adds one document (a single sequence, or none when empty) per key."""
        for key, ids in encoded.items():
            self.builders[key].add_document(ids, [len(ids)] if ids else [])

    def commit(self) -> None:
        """Writes the indices and renames the files into place."""
        for key, prefix in self.output_prefixes.items():
            self.builders[key].finalize(prefix + ".idx.tmp")
            os.replace(prefix + ".bin.tmp", prefix + ".bin")
            os.replace(prefix + ".idx.tmp", prefix + ".idx")

    def abort(self) -> None:
        """Closes and deletes the temporary files."""
        for key, prefix in self.output_prefixes.items():
            self.builders[key].data_file.close()
            for suffix in (".bin.tmp", ".idx.tmp"):
                if os.path.exists(prefix + suffix):
                    os.remove(prefix + suffix)


def preprocess_jsonl(
    input_path: str | os.PathLike,
    output_prefix: str | os.PathLike,
    tokenizer_kwargs: dict,
    *,
    json_keys: Iterable[str] = ("text",),
    append_eod: bool = False,
    workers: int = 1,
    skip_malformed: bool = False,
    chunksize: int = 32,
    progress: bool = True,
) -> PreprocessResult:
    """Tokenizes a JSONL file into ``<output_prefix>_<key>_document.bin/.idx`` per key.

    ``tokenizer_kwargs`` are ``build_tokenizer``'s arguments (``tokenizer_type=...`` etc.); each
    worker builds its own tokenizer from them. Blank lines are ignored. Malformed lines raise
    ``MalformedInputError`` listing their line numbers, and nothing is written, unless
    ``skip_malformed`` is set; then they are left out and returned in ``result.malformed``.
    """
    json_keys = tuple(json_keys)
    if not json_keys:
        raise ValueError("--json-keys needs at least one key")
    input_path, output_prefix = str(input_path), str(output_prefix)
    if not os.path.isfile(input_path):
        raise ValueError(f"--input {input_path}: no such file")
    vocab_size = build_tokenizer(**tokenizer_kwargs).vocab_size  # fails early on bad flags
    Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)
    result = PreprocessResult({key: f"{output_prefix}_{key}_document" for key in json_keys})
    writers = _DatasetWriters(result.output_prefixes, vocab_size)
    try:
        lines = _encoded_lines(
            input_path, tokenizer_kwargs, json_keys, append_eod, workers, chunksize
        )
        total = os.path.getsize(input_path)
        with (
            contextlib.closing(lines),
            tqdm(total=total, unit="B", unit_scale=True, disable=not progress) as bar,
        ):
            for number, encoded, num_bytes in lines:
                bar.update(num_bytes)
                if isinstance(encoded, str):
                    result.malformed.append((number, encoded))
                    continue
                writers.add(encoded)
                result.num_documents += 1
                result.num_tokens += sum(len(ids) for ids in encoded.values())
        if result.malformed and not skip_malformed:
            raise MalformedInputError(input_path, result.malformed)
    except BaseException:
        writers.abort()
        raise
    writers.commit()
    return result
