"""Tokenize a JSONL corpus into Megatron .bin/.idx files (Megatron-LM's flags).

    python tools/preprocess_data.py --input brown/train.jsonl --output-prefix data/brown \
        --tokenizer-type GPT2BPETokenizer --vocab-file gpt2-vocab.json \
        --merge-file gpt2-merges.txt --append-eod --workers 2

writes data/brown_text_document.bin/.idx. See megatron/early_exit/data/preprocess.py.
"""

import argparse
import sys

from megatron.early_exit.data.preprocess import (
    MalformedInputError,
    describe_malformed,
    preprocess_jsonl,
)
from megatron.early_exit.data.tokenizers import TOKENIZER_TYPES


def parse_args(argv=None) -> argparse.Namespace:
    """Megatron-LM's preprocess_data.py flags that apply without sentence splitting."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", required=True, help="JSONL file, one document per line")
    parser.add_argument("--output-prefix", required=True)
    parser.add_argument("--json-keys", nargs="+", default=["text"])
    parser.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    parser.add_argument("--vocab-file", help="GPT2BPETokenizer: encoder.json / gpt2-vocab.json")
    parser.add_argument("--merge-file", help="GPT2BPETokenizer: vocab.bpe / gpt2-merges.txt")
    parser.add_argument("--tokenizer-model", help="SentencePiece .model or a local HF directory")
    parser.add_argument("--vocab-size", type=int, help="NullTokenizer: ids without EOD")
    parser.add_argument("--append-eod", action="store_true", help="end each document with EOD")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--skip-malformed", action="store_true", help="skip bad lines, list them")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    """Runs the preprocessing; exit status 1 on malformed input, 2 on bad flags."""
    args = parse_args(argv)
    tokenizer_kwargs = dict(
        tokenizer_type=args.tokenizer_type,
        vocab_file=args.vocab_file,
        merge_file=args.merge_file,
        tokenizer_model=args.tokenizer_model,
        vocab_size=args.vocab_size,
    )
    try:
        result = preprocess_jsonl(
            args.input,
            args.output_prefix,
            tokenizer_kwargs,
            json_keys=args.json_keys,
            append_eod=args.append_eod,
            workers=args.workers,
            skip_malformed=args.skip_malformed,
            progress=not args.no_progress,
        )
    except MalformedInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if result.malformed:
        print(f"skipped {describe_malformed(result.malformed)}", file=sys.stderr)
    print(f"{result.num_documents} documents, {result.num_tokens} tokens")
    for prefix in result.output_prefixes.values():
        print(f"wrote {prefix}.bin and {prefix}.idx")
    return 0


if __name__ == "__main__":
    sys.exit(main())
