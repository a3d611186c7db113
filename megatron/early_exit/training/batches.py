"""Microbatches of random windows from a token stream (the quickstart's data source; the
Megatron indexed-dataset path lives in :mod:`megatron.early_exit.data.datasets`)."""

from __future__ import annotations

from collections.abc import Iterator

import torch


def causal_mask(seq_length: int) -> torch.Tensor:
    """Boolean ``[1, 1, s, s]`` mask, True where attention is not allowed."""
    return torch.ones(1, 1, seq_length, seq_length, dtype=torch.bool).triu(1)


def window_batch(tokens: torch.Tensor, starts: torch.Tensor, seq_length: int) -> dict:
    """A training microbatch from windows ``tokens[start : start + seq_length + 1]``."""
    windows = torch.stack([tokens[s : s + seq_length + 1] for s in starts.tolist()])
    batch_size = windows.shape[0]
    return {
        "input_ids": windows[:, :-1].contiguous(),
        "labels": windows[:, 1:].contiguous(),
        "position_ids": torch.arange(seq_length).unsqueeze(0).expand(batch_size, -1).contiguous(),
        "attention_mask": causal_mask(seq_length),
        "loss_mask": torch.ones(batch_size, seq_length),
    }


def random_window_batches(
    tokens: torch.Tensor,
    seq_length: int,
    micro_batch_size: int,
    num_microbatches: int,
    seed: int,
) -> Iterator[list[dict]]:
    """Endless iterations, each a list of ``num_microbatches`` microbatches of random windows."""
    if tokens.numel() <= seq_length + 1:
        raise ValueError(
            f"the token stream has {tokens.numel()} tokens; need more than seq_length + 1 = "
            f"{seq_length + 1}"
        )
    generator = torch.Generator().manual_seed(seed)
    high = tokens.numel() - seq_length - 1
    while True:
        yield [
            window_batch(
                tokens, torch.randint(0, high, (micro_batch_size,), generator=generator), seq_length
            )  # fmt: skip
            for _ in range(num_microbatches)
        ]


def split_tokens(
    tokens: torch.Tensor, held_out_fraction: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a token stream into a training head and a held-out tail."""
    cut = int(tokens.numel() * (1.0 - held_out_fraction))
    return tokens[:cut], tokens[cut:]
