"""Serve an early-exit checkpoint over HTTP: Megatron-style ``PUT /api``, OpenAI-style
``POST /v1/completions`` and ``POST /v1/chat/completions`` (with ``stream: true``),
``GET /v1/models``, the tokenizer routes lm-evaluation-harness reads and ``GET /health``.

    python tools/run_text_generation_server.py --load CKPT [--port 5000] [--host 127.0.0.1]
    torchrun --nproc-per-node 2 tools/run_text_generation_server.py --load CKPT   # TP=2
    torchrun --nproc-per-node 4 tools/run_text_generation_server.py --load CKPT \
        --pipeline-model-parallel-size 2                                          # TP=2 x PP=2

``--load`` alone is enough: model shape, exits and tokenizer come from the checkpoint, whatever
layout it was saved with. Rank 0 serves HTTP; the other ranks follow its broadcast commands.
With PP>1 requests decode with pipelined early exit; with PP=1, with KV recomputation (or
self-speculation on request). The world size must be TP x PP (one model replica).
"""

import argparse
import os
from pathlib import Path

from megatron.early_exit.server.protocol import ServerLimits


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load", required=True, help="checkpoint directory")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--tokenizer-model", default=None, help="override the recorded tokenizer")
    parser.add_argument(
        "--tensor-model-parallel-size", type=int, default=None, help="default: world / PP"
    )
    parser.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    parser.add_argument("--max-prompts", type=int, default=128)
    parser.add_argument("--max-prompt-tokens", type=int, default=4096)
    parser.add_argument("--max-tokens-to-generate", type=int, default=1024)
    parser.add_argument("--max-body-bytes", type=int, default=ServerLimits.max_body_bytes)
    parser.add_argument(
        "--max-request-tokens", type=int, default=ServerLimits.max_request_tokens,
        help="most prompts x (prompt + new) tokens per request",
    )  # fmt: skip
    parser.add_argument(
        "--max-queued-requests", type=int, default=ServerLimits.max_queued_requests,
        help="requests waiting or running; one more is answered 503",
    )  # fmt: skip
    parser.add_argument(
        "--max-request-seconds", type=float, default=ServerLimits.max_request_seconds,
        help="longest a request may wait and run before it is stopped with 504 "
        "(continuous batching)",
    )  # fmt: skip
    parser.add_argument(
        "--batching", choices=("auto", "continuous", "serial"), default="auto",
        help="continuous: concurrent requests join one running batch between decode steps (one "
        "process); serial: one request at a time (what multi-process servers do); auto: "
        "continuous in one process, else serial",
    )  # fmt: skip
    parser.add_argument(
        "--max-batch-rows", type=int, default=64,
        help="continuous batching: most prompts decoding at once (more wait)",
    )  # fmt: skip
    parser.add_argument("--max-connections", type=int, default=64, help="503 beyond this")
    parser.add_argument(
        "--header-timeout", type=float, default=10.0,
        help="seconds a connection may take to send a request's headers",
    )  # fmt: skip
    parser.add_argument(
        "--chat-template", default=None,
        help="Jinja chat template file (default: the checkpoint tokenizer's)",
    )  # fmt: skip
    parser.add_argument(
        "--model-name", default=None, help="name in /v1/models (default: the --load folder's)"
    )
    return parser.parse_args()


def parallel_layout(args, world_size: int) -> tuple[int, int]:
    """``(TP, PP)`` from the flags; the world must be exactly one TP x PP model replica."""
    pp = args.pipeline_model_parallel_size
    if pp < 1:
        raise SystemExit(f"--pipeline-model-parallel-size must be >= 1, got {pp}")
    tp = args.tensor_model_parallel_size or world_size // pp
    if tp < 1 or tp * pp != world_size:
        raise SystemExit(
            f"--tensor-model-parallel-size {tp} x --pipeline-model-parallel-size {pp} must equal "
            f"the number of processes ({world_size}); serving runs one model replica"
        )
    return tp, pp


def continuous_batching(args, world_size: int) -> bool:
    """Whether ``--batching`` asks for continuous batching (only in one process)."""
    if args.batching == "continuous" and world_size > 1:
        raise SystemExit(
            f"--batching continuous needs one process (got {world_size}): the ranks of a "
            "multi-process server decode one request at a time; use --batching serial or auto"
        )
    if args.max_batch_rows < 1:
        raise SystemExit(f"--max-batch-rows must be >= 1, got {args.max_batch_rows}")
    return args.batching == "continuous" or (args.batching == "auto" and world_size == 1)


def build_generator(
    args, tensor_parallel_size: int, pipeline_parallel_size: int = 1, continuous: bool = False
):
    """Initialise the platform for the layout, load ``--load`` into this rank's slice."""
    from megatron.early_exit.checkpoint.loading import Layout, load_for_inference
    from megatron.early_exit.server.engine_generator import EngineGenerator

    layout = Layout(tensor_parallel_size, pipeline_parallel_size)
    try:
        loaded = load_for_inference(args.load, layout, tokenizer_model=args.tokenizer_model)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    return EngineGenerator(
        loaded.model, loaded.tokenizer, loaded.info.model["max_sequence_length"],
        continuous=continuous, max_batch_rows=args.max_batch_rows,
    )  # fmt: skip


def main() -> None:
    args = parse_args()
    from megatron.early_exit import platform
    from megatron.early_exit.server.app import create_app, serve
    from megatron.early_exit.server.worker_loop import run_ranks

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    continuous = continuous_batching(args, world_size)
    generator = build_generator(args, *parallel_layout(args, world_size), continuous=continuous)
    try:
        limits = ServerLimits(
            max_prompts=args.max_prompts,
            max_prompt_tokens=args.max_prompt_tokens,
            max_tokens_to_generate=args.max_tokens_to_generate,
            max_body_bytes=args.max_body_bytes,
            max_request_tokens=args.max_request_tokens,
            max_queued_requests=args.max_queued_requests,
            max_request_seconds=args.max_request_seconds,
        )
    except ValueError as error:
        raise SystemExit(str(error)) from None
    chat_template = Path(args.chat_template).read_text() if args.chat_template else None

    def serve_service(service):
        serve(create_app(service), args.host, args.port, header_timeout_s=args.header_timeout,
              max_connections=args.max_connections)  # fmt: skip

    try:
        run_ranks(generator, serve_service, limits=limits, chat_template=chat_template,
                  model_name=args.model_name or Path(args.load).name)  # fmt: skip
    finally:
        generator.close()
    platform.destroy()


if __name__ == "__main__":
    main()
