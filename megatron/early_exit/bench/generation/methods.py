"""The rows of the generation benchmark and the runners that produce their outputs.

A runner is a callable ``runner(prompts) -> Outputs`` that decodes every prompt greedily, batch
by batch. Our decoding methods all go through ``inference.generate.generate`` and differ only in
their ``GenerationParams``: :data:`ENGINE_METHODS` maps each method name to those settings, so a
new method (e.g. ``pipelined``) is one entry there plus its name in the CLI. The Hugging Face
baseline is a different runner over transformers' ``generate``.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

HF_METHOD = "hf_transformers"


@dataclass(frozen=True)
class MethodSpec:
    """One row of the benchmark."""

    method: str
    """``full``, ``recompute``, ``speculative``, ``pipelined`` or ``hf_transformers``."""
    threshold: float | None = None
    """Exit threshold (``recompute``, ``pipelined``)."""
    num_draft_tokens: int | None = None
    """``speculative``: tokens drafted per round."""
    draft_exit_depth: int | None = None
    """``speculative``: the exit that drafts."""
    compiled: bool = False
    """Layers run through ``torch.compile`` (``inference.lean.set_compile``)."""

    @property
    def label(self) -> str:
        if self.compiled:
            return f"{self._label} compiled"
        return self._label

    @property
    def _label(self) -> str:
        if self.threshold is not None:
            return f"{self.method} {self.threshold:g}"
        if self.num_draft_tokens is not None:
            return f"{self.method} k={self.num_draft_tokens} d={self.draft_exit_depth}"
        return self.method


def method_specs(
    methods: Sequence[str],
    thresholds: Sequence[float],
    num_draft_tokens: Sequence[int],
    draft_exit_depths: Sequence[int] | None,
    exit_depths: Sequence[int],
    compiled: bool = False,
) -> list[MethodSpec]:
    """Every row to run, full decoding (the reference) first; ``methods`` are the CLI names
    (``hf`` for the Hugging Face baseline); ``compiled`` adds full decoding with compiled
    layers."""
    specs = [MethodSpec("full")]
    if compiled:
        specs.append(MethodSpec("full", compiled=True))
    for method in methods:
        if method in ("recompute", "pipelined"):
            specs += [MethodSpec(method, threshold=t) for t in thresholds]
        elif method == "speculative":
            depths = draft_exit_depths or [min(exit_depths)]
            specs += [
                MethodSpec(method, num_draft_tokens=k, draft_exit_depth=d)
                for d in depths
                for k in num_draft_tokens
            ]
        elif method == "hf":
            specs.append(MethodSpec(HF_METHOD))
        elif method != "full":
            raise ValueError(f"unknown method {method!r}")
    return specs


@dataclass
class Outputs:
    """Generated tokens, and the exit depth of each (None for HF), per prompt in order."""

    tokens: list[list[int]]
    exit_depths: list[list[int]] | None


def batches(prompts: Sequence[Sequence[int]], batch_size: int) -> Iterator[Sequence[Sequence[int]]]:
    for start in range(0, len(prompts), batch_size):
        yield prompts[start : start + batch_size]


# ---------------------------------------------------------------------------------------------
# Our engine
# ---------------------------------------------------------------------------------------------


def _full(spec: MethodSpec, policy) -> dict:
    return dict(early_exit=False)


def _recompute(spec: MethodSpec, policy) -> dict:
    return dict(method="recompute", exit_policy=policy)


def _speculative(spec: MethodSpec, policy) -> dict:
    return dict(
        method="speculative",
        num_draft_tokens=spec.num_draft_tokens,
        draft_exit_depth=spec.draft_exit_depth,
    )


def _pipelined(spec: MethodSpec, policy) -> dict:
    return dict(method="pipelined", exit_policy=policy)


ENGINE_METHODS: dict[str, Callable[[MethodSpec, object], dict]] = {
    "full": _full,
    "recompute": _recompute,
    "speculative": _speculative,
    "pipelined": _pipelined,
}
"""Method name -> the ``GenerationParams`` fields that select it (given the row and its
``ExitPolicy``). At PP>1, ``generate`` decodes ``early_exit=False`` at full depth through the
pipeline, so ``full`` serves both layouts."""


def engine_params(
    spec: MethodSpec,
    *,
    max_new_tokens: int,
    measure: str = "max_prob",
    eos_token_ids: tuple[int, ...] = (),
    pad_token_id: int = 0,
    seed: int = 1234,
):
    """Greedy ``GenerationParams`` of one row."""
    from megatron.early_exit.inference.decide import ExitPolicy
    from megatron.early_exit.inference.generate import GenerationParams

    threshold = spec.threshold if spec.threshold is not None else 1.0
    policy = ExitPolicy(threshold=threshold, measure=measure)
    return GenerationParams(
        max_new_tokens=max_new_tokens,
        temperature=0.0,
        eos_token_ids=eos_token_ids,
        pad_token_id=pad_token_id,
        seed=seed,
        **ENGINE_METHODS[spec.method](spec, policy),
    )


class EngineRunner:
    """Our ``generate`` with one row's settings, batch by batch."""

    def __init__(self, model, params, batch_size: int, compiled: bool = False):
        self.model, self.params, self.batch_size = model, params, batch_size
        self.compiled = compiled
        self.first_call_s: float | None = None
        """Seconds of the first call (with ``compiled``: includes the compilation)."""

    def __call__(self, prompts: Sequence[Sequence[int]]) -> Outputs:
        from megatron.early_exit.inference import lean
        from megatron.early_exit.inference.generate import generate

        started = time.perf_counter()
        tokens, exit_depths = [], []
        lean.set_compile(self.compiled)
        try:
            for batch in batches(prompts, self.batch_size):
                for result in generate(self.model, batch, self.params):
                    tokens.append(result.tokens)
                    exit_depths.append(result.exit_depths)
        finally:
            lean.set_compile(False)
        if self.first_call_s is None:
            self.first_call_s = time.perf_counter() - started
        return Outputs(tokens, exit_depths)


# ---------------------------------------------------------------------------------------------
# Hugging Face transformers
# ---------------------------------------------------------------------------------------------


class HFRunner:
    """transformers' greedy ``generate`` (KV cache on) on the converted weights, batched and
    left-padded like ours, with our end-of-sequence rule: with ``eos_id`` None a row never stops
    early; else it stops at the EOS token, which is not reported."""

    def __init__(self, model, batch_size: int, max_new_tokens: int, pad_id: int, eos_id):
        self.model, self.batch_size, self.max_new_tokens = model, batch_size, max_new_tokens
        self.pad_id, self.eos_id = pad_id, eos_id
        model.generation_config.eos_token_id = eos_id

    @torch.no_grad()
    def __call__(self, prompts: Sequence[Sequence[int]]) -> Outputs:
        device = next(self.model.parameters()).device
        tokens = []
        for batch in batches(prompts, self.batch_size):
            width = max(len(p) for p in batch)
            ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, prompt in enumerate(batch):
                ids[row, width - len(prompt) :] = torch.tensor(list(prompt))
                mask[row, width - len(prompt) :] = 1
            out = self.model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device),
                max_new_tokens=self.max_new_tokens, do_sample=False, use_cache=True,
                pad_token_id=self.pad_id,
            )  # fmt: skip
            for row in out[:, width:].tolist():
                if self.eos_id is not None and self.eos_id in row:
                    row = row[: row.index(self.eos_id)]
                tokens.append(row)
        return Outputs(tokens, None)


def load_hf_runner(load: str, batch_size: int, max_new_tokens: int, pad_id: int, eos_id):
    """``(HFRunner, None)``, or ``(None, reason)`` when transformers is missing or the
    checkpoint has no Llama/GPT-2 equivalent. Converts in-process with ``megatron_to_hf`` into a
    temporary directory and loads it in float32; needs the single-process TP=1/PP=1 platform."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as exc:
        return None, f"transformers is not installed ({exc})"
    from megatron.early_exit import platform
    from megatron.early_exit.checkpoint.convert import ConversionError, megatron_to_hf

    with tempfile.TemporaryDirectory(prefix="bench_hf_") as tmp:
        try:
            megatron_to_hf(load, tmp)
        except ConversionError as exc:
            return None, f"the checkpoint does not convert to Hugging Face: {exc}"
        model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    model.to(platform.device()).eval()
    return HFRunner(model, batch_size, max_new_tokens, pad_id, eos_id), None
