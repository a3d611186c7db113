"""Train a tiny early-exit GPT on CPU on the bundled Brown corpus sample and print every exit's
held-out loss before and after training.

    python examples/cpu_quickstart.py [--train-iters 300]

Byte-level tokens (vocabulary 256), 4 layers, exits after layers 1, 2 and 3 (norm, norm and MLP
heads), megatron-core's DDP/Adam/LR schedule under EE-LLM's CPU platform layer.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from megatron.early_exit import platform
from megatron.early_exit.config import EarlyExitTransformerConfig, make_exit_heads
from megatron.early_exit.model.builder import build_early_exit_model
from megatron.early_exit.training.batches import random_window_batches, split_tokens
from megatron.early_exit.training.loop import TrainingConfig, evaluate, setup_trainer, train

SAMPLE = Path(__file__).resolve().parents[1] / "tests" / "assets" / "brown_sample.txt"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-iters", type=int, default=300)
    parser.add_argument("--seq-length", type=int, default=128)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--log-interval", type=int, default=25)
    parser.add_argument("--seed", type=int, default=1234)
    return parser.parse_args()


def model_config() -> EarlyExitTransformerConfig:
    exits = make_exit_heads([1, 2], structure="norm", loss_weights=[0.3, 0.5])
    exits += make_exit_heads([3], structure="mlp", loss_weights=[0.8])
    return EarlyExitTransformerConfig(
        num_layers=4,
        hidden_size=128,
        ffn_hidden_size=512,
        num_attention_heads=4,
        normalization="RMSNorm",
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.02,
        exit_heads=exits,
        **platform.config_overrides(),
    )


def print_table(before: dict, after: dict) -> None:
    print(f"\n{'head':<14}{'held-out loss before':>22}{'after':>10}{'perplexity':>12}")
    for key in before:
        name = "final (layer 4)" if key == "lm_loss" else f"exit @ layer {key.split('_')[1]}"
        ppl = torch.tensor(after[key]).exp().item()
        print(f"{name:<14}{before[key]:>22.3f}{after[key]:>10.3f}{ppl:>12.2f}")


def log(metrics) -> None:
    exits = "  ".join(
        f"exit{d} {v:.3f} (w {metrics.exit_weights[d]:.2f})" for d, v in metrics.exit_losses.items()
    )
    print(
        f"iter {metrics.iteration:5d} | lm {metrics.lm_loss:.3f} | {exits} | "
        f"lr {metrics.lr:.2e} | grad {metrics.grad_norm:.2f} | "
        f"{metrics.tokens_per_second:,.0f} tok/s",
        flush=True,
    )


def main() -> None:
    args = parse_args()
    platform.initialize(1, 1, seed=args.seed)
    tokens = torch.tensor(list(SAMPLE.read_bytes()), dtype=torch.long)
    train_tokens, held_out = split_tokens(tokens, held_out_fraction=0.1)
    config = model_config()
    model = build_early_exit_model(
        config, 256, args.seq_length, position_embedding_type="rope", seed=args.seed
    )
    trainer = setup_trainer(
        model,
        TrainingConfig(
            train_iters=args.train_iters, lr=args.lr, min_lr=args.lr / 10,
            lr_warmup_iters=args.train_iters // 20, log_interval=args.log_interval,
        ),
    )  # fmt: skip
    held_out_batches = next(
        random_window_batches(held_out, args.seq_length, args.micro_batch_size, 8, seed=0)
    )
    before = evaluate(trainer, held_out_batches)
    start = time.perf_counter()
    batches = random_window_batches(
        train_tokens, args.seq_length, args.micro_batch_size, 1, seed=args.seed
    )
    train(trainer, batches, on_log=log)
    after = evaluate(trainer, held_out_batches)
    print(f"\ntrained {args.train_iters} iterations in {time.perf_counter() - start:.1f} s")
    print_table(before, after)
    platform.destroy()


if __name__ == "__main__":
    main()
