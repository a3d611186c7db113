"""Serve an early-exit checkpoint over HTTP: Megatron-style ``PUT /api``, OpenAI-style
``POST /v1/completions`` (with ``stream: true``) and ``GET /health``.

    python tools/run_text_generation_server.py --load CKPT [--port 5000] [--host 127.0.0.1]
    torchrun --nproc-per-node 2 tools/run_text_generation_server.py --load CKPT   # TP=2

``--load`` alone is enough: model shape, exits and tokenizer come from the checkpoint. Rank 0
serves HTTP; the other ranks follow its broadcast commands. Pipeline-parallel serving (pipelined
early-exit decoding) is not available yet: all ranks form one tensor-parallel group.
"""

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load", required=True, help="checkpoint directory")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--tokenizer-model", default=None, help="override the recorded tokenizer")
    parser.add_argument("--max-prompts", type=int, default=128)
    parser.add_argument("--max-prompt-tokens", type=int, default=4096)
    parser.add_argument("--max-tokens-to-generate", type=int, default=1024)
    return parser.parse_args()


def build_generator(args, tensor_parallel_size: int):
    from megatron.early_exit.checkpoint.add_exits import (
        build_model,
        checkpoint_config,
        make_trainer,
    )
    from megatron.early_exit.data.tokenizers import build_tokenizer
    from megatron.early_exit.server.engine_generator import EngineGenerator
    from megatron.early_exit.training.checkpointing import load_checkpoint, read_checkpoint_info

    info = read_checkpoint_info(args.load)
    config = checkpoint_config(info, tensor_model_parallel_size=tensor_parallel_size)
    model = build_model(config, info.model)
    load_checkpoint(args.load, make_trainer(model), load_optimizer=False)
    tokenizer_info = dict(info.model_args.get("tokenizer") or {})
    if args.tokenizer_model:
        tokenizer_info["tokenizer_model"] = args.tokenizer_model
    if not tokenizer_info.get("tokenizer_type"):
        raise SystemExit(f"{args.load} records no tokenizer; pass --tokenizer-model")
    kind = tokenizer_info.pop("tokenizer_type")
    tokenizer = build_tokenizer(kind, **{k: v for k, v in tokenizer_info.items() if v is not None})
    return EngineGenerator(model, tokenizer, info.model["max_sequence_length"])


def main() -> None:
    args = parse_args()
    from megatron.early_exit import platform
    from megatron.early_exit.server.app import create_app, serve
    from megatron.early_exit.server.protocol import ServerLimits
    from megatron.early_exit.server.worker_loop import run_ranks

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    platform.initialize(world_size, 1)
    generator = build_generator(args, world_size)
    limits = ServerLimits(args.max_prompts, args.max_prompt_tokens, args.max_tokens_to_generate)
    run_ranks(generator, lambda service: serve(create_app(service), args.host, args.port),
              limits=limits, model_name=Path(args.load).name)  # fmt: skip
    platform.destroy()


if __name__ == "__main__":
    main()
