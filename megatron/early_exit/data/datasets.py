"""Train/valid/test GPT datasets through megatron-core's ``BlendedMegatronDatasetBuilder``.

The inputs are Megatron-LM's flags: ``--data-path`` (one prefix, several prefixes, or
"w1 p1 w2 p2 ..."), ``--split "949,50,1"``, ``--seq-length``, ``--seed``, the per-split sample
counts, or ``--mock-data``. Each sample is megatron-core's dict: ``tokens``, ``labels``,
``loss_mask``, ``position_ids`` (and ``attention_mask`` when asked for; ``dataset_id`` when
blended), all of length ``seq_length``.

``GPTDataset`` caches its shuffle indices under ``<prefix>/cache/`` unless given a cache path;
``BlendedDataset`` only caches with a path, and then calls ``torch.distributed.get_rank()``
unconditionally, so the cache path is used only when a process group is initialised.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.datasets.utils import get_blend_from_list

SPLIT_NAMES = ("train", "valid", "test")


class GPTDatasets(NamedTuple):
    """One dataset per split; a split with zero weight (or no samples asked for) is None."""

    train: torch.utils.data.Dataset | None
    valid: torch.utils.data.Dataset | None
    test: torch.utils.data.Dataset | None


def parse_data_path(data_path: str | Sequence[str]) -> tuple[list[str], list[float] | None]:
    """``--data-path`` as (prefixes, weights or None), with Megatron's rules: an even-length list
    whose even entries are numbers is "w1 p1 w2 p2 ..."; anything else is a list of prefixes."""
    items = data_path.split() if isinstance(data_path, str) else [str(p) for p in data_path]
    if not items:
        raise ValueError("--data-path is empty")
    prefixes, weights = get_blend_from_list(items)
    if weights is not None and any(w < 0 for w in weights):
        raise ValueError(f"--data-path weights must be non-negative, got {weights}")
    if weights is not None and sum(weights) <= 0:
        raise ValueError("--data-path weights must not all be zero")
    return prefixes, weights


def check_data_prefixes(prefixes: Sequence[str]) -> None:
    """Raises ValueError naming the first missing ``.bin`` or ``.idx`` file."""
    for prefix in prefixes:
        for suffix in (".bin", ".idx"):
            if not os.path.isfile(prefix + suffix):
                raise ValueError(
                    f"--data-path: {prefix + suffix} does not exist (a data prefix names the "
                    "'<output-prefix>_text_document' written by tools/preprocess_data.py, "
                    "without .bin/.idx)"
                )


def _check_splits_not_empty(prefixes: Sequence[str], split: str, num_samples) -> None:
    """A split that is asked for samples but gets no documents makes megatron-core's
    GPTDataset loop forever (zero tokens per epoch never reach the request); refuse it."""
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    for prefix in prefixes:
        num_docs = len(IndexedDataset(prefix).sequence_lengths)
        for name, bounds, samples in zip(SPLIT_NAMES, matrix, num_samples):
            if bounds is None or not samples:
                continue
            begin, end = (int(round(b * num_docs)) for b in bounds)
            if end <= begin:
                raise ValueError(
                    f"--split {split} leaves the {name} split of {prefix} ({num_docs} documents) "
                    "empty; give that split more weight, or weight 0 and no samples"
                )


def _drop_unrequested_splits(split: str, num_samples: Sequence[int | None]) -> str:
    """Zero the weight of splits asked for 0 samples: megatron-core would still build them, and
    an empty split (e.g. 0.1% of a small corpus) makes GPTDataset loop forever."""
    weights = parse_and_normalize_split(split)
    kept = [0.0 if n == 0 else w for w, n in zip(weights, num_samples)]
    if not any(kept):
        raise ValueError(f"--split {split}: every split with samples asked for has weight 0")
    return ",".join(repr(w) for w in kept)


def build_gpt_datasets(
    tokenizer,
    *,
    seq_length: int,
    seed: int,
    num_samples: Sequence[int | None],
    data_path: str | Sequence[str] | None = None,
    split: str = "949,50,1",
    mock_data: bool = False,
    reset_position_ids: bool = False,
    reset_attention_mask: bool = False,
    eod_mask_loss: bool = False,
    create_attention_mask: bool = False,
    data_cache_path: str | None = None,
    is_built_on_rank: Callable[[], bool] | None = None,
) -> GPTDatasets:
    """Builds the train/valid/test datasets from Megatron-style arguments.

    ``num_samples`` is (train, valid, test), as in Megatron's ``train_val_test_num_samples``;
    blend weights need all three. A blended split has exactly that many samples; an unblended
    one holds whole epochs, so at least that many. ``tokenizer`` needs ``vocab_size``, ``eod`` and
    ``unique_identifiers`` (every tokenizer from ``build_tokenizer`` has them).
    ``create_attention_mask`` is off by default: megatron-core builds the causal mask itself,
    and a per-sample [1, s, s] mask only costs memory. ``is_built_on_rank`` (default: every rank)
    is megatron-core's hook to build the data only where it is consumed.
    """
    if len(num_samples) != len(SPLIT_NAMES):
        raise ValueError(f"num_samples needs (train, valid, test) counts, got {num_samples}")
    if mock_data == (data_path is not None):
        raise ValueError("give exactly one of --data-path and --mock-data")
    split = _drop_unrequested_splits(split, num_samples)
    blend = None
    if data_path is not None:
        blend = parse_data_path(data_path)
        check_data_prefixes(blend[0])
        if blend[1] is not None and any(n is None for n in num_samples):
            raise ValueError("--data-path blend weights need a sample count for every split")
        _check_splits_not_empty(blend[0], split, num_samples)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=blend,
        split=split if blend is not None else None,
        path_to_cache=data_cache_path if distributed else None,
        tokenizer=tokenizer,
        reset_position_ids=reset_position_ids,
        reset_attention_mask=reset_attention_mask,
        eod_mask_loss=eod_mask_loss,
        create_attention_mask=create_attention_mask,
    )
    dataset_class = MockGPTDataset if mock_data else GPTDataset
    builder = BlendedMegatronDatasetBuilder(
        dataset_class, list(num_samples), is_built_on_rank or (lambda: True), config
    )
    return GPTDatasets(*builder.build())
