"""Held-out quality of every exit of a checkpoint: loss, perplexity, top-1 agreement with the
final head, and (for exits with a confidence head) how well it predicts that agreement.

    python tools/eval_exits.py --load CKPT [--text-jsonl assets/brown-1.9.80/heldout.jsonl] \\
        [--seq-length 256] [--num-windows 32] [--output-json quality.json]

The text is tokenized with the checkpoint's tokenizer, documents are joined with its end-of-text
token and cut into non-overlapping windows; one process, any saved layout (resharded on load).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load", required=True, help="checkpoint directory")
    parser.add_argument("--text-jsonl", default=None, help="default: Brown held-out files")
    parser.add_argument("--json-key", default="text")
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--num-windows", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--tokenizer-model", default=None, help="override the recorded tokenizer")
    parser.add_argument("--output-json", default=None)
    parser.add_argument("--label", default="", help="a name printed above the table")
    args = parser.parse_args(argv)
    for flag in ("seq_length", "num_windows", "batch_size"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    return args


def read_texts(path: Path, key: str) -> list[str]:
    texts = []
    with open(path) as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                texts.append(json.loads(line)[key])
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise SystemExit(
                    f"{path}:{number}: not a JSON object with {key!r} ({error})"
                ) from None
    return texts


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron.early_exit import platform
    from megatron.early_exit.checkpoint.loading import load_for_inference
    from megatron.early_exit.data.corpus import prepare_brown
    from megatron.early_exit.inference.exit_quality import exit_quality, format_table, token_windows

    path = Path(args.text_jsonl) if args.text_jsonl else prepare_brown().heldout
    texts = read_texts(path, args.json_key)
    try:
        loaded = load_for_inference(args.load, tokenizer_model=args.tokenizer_model)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    model, tokenizer = loaded.model, loaded.tokenizer
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer.tokenize(text))
        ids.append(tokenizer.eod)
        if len(ids) >= args.num_windows * (args.seq_length + 1):
            break
    windows = token_windows(ids, args.seq_length + 1, args.num_windows)
    rows = exit_quality(model, windows, args.batch_size)
    print(format_table(rows, args.label or f"{args.load}: {windows.numel()} tokens of {path}"))
    if args.output_json:
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        record = {"load": str(args.load), "text": str(path), "windows": list(windows.shape)}
        record["heads"] = [r.as_dict() for r in rows]
        Path(args.output_json).write_text(json.dumps(record, indent=1) + "\n")
    platform.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
