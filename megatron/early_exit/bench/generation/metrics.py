"""What the generation benchmark reports, as pure functions of token lists and call counts.

Output quality against the full model's greedy output (the reference), per prompt and pooled:

* **token agreement**: position-wise. For a prompt, the positions ``0..max(len(c), len(r)) - 1``
  are compared; a position counts as agreeing when both sequences have a token there and the
  tokens are equal, so a length mismatch counts as disagreements. Pooled over prompts as
  total agreeing positions / total positions. After a first divergence the two texts are
  usually shifted, so this is a strict measure; the next two are softer.
* **prefix agreement**: tokens before the first divergence / reference length (pooled the same
  way): the share of the full model's output reproduced exactly before anything differs.
* **ROUGE-L**: the F1 of the longest common subsequence of the two token sequences
  (``P = LCS / len(c)``, ``R = LCS / len(r)``), averaged over prompts; 1.0 when both are empty.

Where tokens exit: mean exit depth and the share of tokens per exit (the final head reports
``num_layers``), from the ``exit_depths`` that ``generate`` returns.

The **cost model** behind the ideal speed-up prices module calls. A run is summarised as a count
of calls per :data:`CallKey` ``(module, width)``: ``module`` is ``"embedding"``, ``"layer"`` (any
transformer layer of the backbone), ``"exit<d>/<part>"`` (a part of the exit head at depth
``d``: ``norm``, ``mlp``, ``layer``, ``output_layer``, ...) or ``"final/<part>"`` (the final norm
and output layer); ``width`` is the number of positions per row in the call (1 for a decode
step, 2 when a skipped position catches up with the next token, ``k + 1`` in a speculative
verify pass, the prompt width in a prefill). :class:`UnitCosts` holds the measured seconds per
call of each key; the cost of a run is the sum of its calls' unit costs, i.e. the time the model
modules alone would take, without the engine's own work (masks, cache bookkeeping, sampling,
Python). ``ideal_speedup`` = (cost per generated token of full decoding) / (cost per generated
token of the method).
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

CallKey = tuple[str, int]
"""``(module name, positions per row)`` of one module call."""

LAYER = "layer"
EMBEDDING = "embedding"
FINAL = "final"


def key_name(key: CallKey) -> str:
    """``"name@width"``, how call keys are written in the JSON."""
    return f"{key[0]}@{key[1]}"


def exit_module(depth: int) -> str:
    """Name prefix of the exit head at ``depth`` in call keys."""
    return f"exit{depth}"


# ---------------------------------------------------------------------------------------------
# Agreement with the reference
# ---------------------------------------------------------------------------------------------


def lcs_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common subsequence of ``a`` and ``b`` (O(len(a) * len(b)))."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(candidate: Sequence[int], reference: Sequence[int]) -> float:
    """ROUGE-L F1 between two token sequences (1.0 if both are empty, 0.0 if one is)."""
    if not candidate and not reference:
        return 1.0
    lcs = lcs_length(candidate, reference)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(candidate), lcs / len(reference)
    return 2 * precision * recall / (precision + recall)


def matching_positions(candidate: Sequence[int], reference: Sequence[int]) -> tuple[int, int]:
    """``(agreeing positions, compared positions)``; see the module docstring."""
    agreeing = sum(int(c == r) for c, r in zip(candidate, reference))
    return agreeing, max(len(candidate), len(reference))


def common_prefix_length(candidate: Sequence[int], reference: Sequence[int]) -> int:
    """Number of leading tokens the two sequences share."""
    for i, (c, r) in enumerate(zip(candidate, reference)):
        if c != r:
            return i
    return min(len(candidate), len(reference))


@dataclass(frozen=True)
class Agreement:
    """Agreement of a method's outputs with the reference outputs, pooled over prompts."""

    token: float
    prefix: float
    rouge_l: float


def agreement(outputs: Sequence[Sequence[int]], references: Sequence[Sequence[int]]) -> Agreement:
    """Token, prefix and ROUGE-L agreement of ``outputs`` with ``references`` (one per prompt)."""
    if len(outputs) != len(references):
        raise ValueError(f"{len(outputs)} outputs for {len(references)} references")
    if not outputs:
        raise ValueError("agreement needs at least one output")
    agreeing = compared = prefix = reference_tokens = 0
    for out, ref in zip(outputs, references):
        a, n = matching_positions(out, ref)
        agreeing, compared = agreeing + a, compared + n
        prefix += common_prefix_length(out, ref)
        reference_tokens += len(ref)
    return Agreement(
        token=agreeing / compared if compared else 1.0,
        prefix=prefix / reference_tokens if reference_tokens else 1.0,
        rouge_l=statistics.fmean(rouge_l(o, r) for o, r in zip(outputs, references)),
    )


# ---------------------------------------------------------------------------------------------
# Exit depths
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExitStatistics:
    mean_exit_depth: float
    """Mean depth of the head that produced each token (``num_layers`` for the final head)."""
    shares: dict[int, float]
    """Share of tokens per exit depth, sorted by depth; sums to 1."""


def exit_statistics(exit_depths: Iterable[Sequence[int]]) -> ExitStatistics:
    """Mean exit depth and per-exit token shares over every token of every prompt."""
    counts = Counter(depth for row in exit_depths for depth in row)
    total = sum(counts.values())
    if total == 0:
        raise ValueError("no tokens to compute exit statistics from")
    mean = sum(depth * n for depth, n in counts.items()) / total
    return ExitStatistics(mean, {depth: counts[depth] / total for depth in sorted(counts)})


# ---------------------------------------------------------------------------------------------
# Cost model
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UnitCosts:
    """Seconds per call of each ``(module, width)``, measured at one batch size."""

    seconds: Mapping[CallKey, float]

    @classmethod
    def from_samples(cls, samples: Iterable[tuple[CallKey, float]]) -> UnitCosts:
        """The median of the timed calls of each key."""
        by_key: dict[CallKey, list[float]] = {}
        for key, seconds in samples:
            by_key.setdefault(key, []).append(seconds)
        return cls({key: statistics.median(values) for key, values in by_key.items()})

    def cost(self, calls: Mapping[CallKey, int]) -> float:
        """Seconds the model modules of a run with these call counts take."""
        missing = sorted(key for key in calls if key not in self.seconds)
        if missing:
            raise ValueError(f"no measured unit cost for {missing}")
        return sum(n * self.seconds[key] for key, n in calls.items())

    def head(self, prefix: str, width: int = 1) -> float:
        """Seconds of one call of every part of a head (``exit<d>`` or ``final``) at ``width``."""
        parts = [s for (name, w), s in self.seconds.items() if w == width and _under(name, prefix)]
        if not parts:
            raise ValueError(f"no measured unit cost for {prefix} at width {width}")
        return sum(parts)

    def layer(self, width: int = 1) -> float:
        """Seconds of one backbone layer call at ``width``."""
        return self.seconds[(LAYER, width)]

    def full_token(self, num_layers: int) -> float:
        """A full-model decode step at width 1: ``num_layers`` layers and the final head (plus
        the embedding when it was measured)."""
        embedding = self.seconds.get((EMBEDDING, 1), 0.0)
        return embedding + num_layers * self.layer(1) + self.head(FINAL, 1)


def _under(name: str, prefix: str) -> bool:
    return name.startswith(prefix + "/")


def token_cost(
    costs: UnitCosts,
    num_layers: int,
    exit_depth: int,
    evaluated_exits: Sequence[int],
    recompute_skipped: bool = True,
) -> float:
    """Seconds of one decode step (width 1, no catch-up) of a token that left at ``exit_depth``
    after the exits ``evaluated_exits`` ran (the final head runs when ``exit_depth`` is
    ``num_layers``); with ``recompute_skipped`` the ``num_layers - exit_depth`` skipped layers
    are added at width 1, as if recomputed alone later. A per-token illustration of the model;
    the benchmark itself prices the calls each run actually made (:meth:`UnitCosts.cost`)."""
    layers = num_layers if recompute_skipped else exit_depth
    total = costs.seconds.get((EMBEDDING, 1), 0.0) + layers * costs.layer(1)
    total += sum(costs.head(exit_module(d), 1) for d in evaluated_exits)
    if exit_depth == num_layers:
        total += costs.head(FINAL, 1)
    return total


def ideal_speedup(
    costs: UnitCosts,
    reference_calls: Mapping[CallKey, int],
    reference_tokens: int,
    calls: Mapping[CallKey, int],
    tokens: int,
) -> float:
    """(module cost per generated token of the reference) / (that of a method)."""
    if reference_tokens <= 0 or tokens <= 0:
        raise ValueError("ideal_speedup needs generated tokens on both sides")
    reference = costs.cost(reference_calls) / reference_tokens
    return reference / (costs.cost(calls) / tokens)


def work_per_token(calls: Mapping[CallKey, int], tokens: int) -> dict[str, float]:
    """Module calls per generated token: backbone layer calls, layer positions (the sum of the
    calls' widths: the layer work in position-layers), vocabulary projections of the exits and
    of the final head."""
    layer_calls = sum(n for (name, _), n in calls.items() if name == LAYER)
    layer_positions = sum(n * w for (name, w), n in calls.items() if name == LAYER)
    exit_projections = sum(n for (name, _), n in calls.items() if _is_projection(name, "exit"))
    final_projections = sum(n for (name, _), n in calls.items() if _is_projection(name, FINAL))
    return {
        "layer_calls": layer_calls / tokens,
        "layer_positions": layer_positions / tokens,
        "exit_projections": exit_projections / tokens,
        "final_projections": final_projections / tokens,
    }


def _is_projection(name: str, prefix: str) -> bool:
    return name.startswith(prefix) and name.endswith("/output_layer")
