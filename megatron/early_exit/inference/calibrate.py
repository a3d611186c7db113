"""Calibrated early-exit thresholds: CALM's Learn-then-Test (LTT) on a calibration split.

The question answered: which confidence threshold ``lambda`` makes early-exit decoding agree with
full decoding on at least a share ``target`` of tokens, with probability at least ``1 - delta``
over the draw of the calibration data?

Data (:class:`CalibrationData`, collected by :func:`collect_calibration_data`): for every
calibration token ``n`` and exit ``e`` (in increasing depth), the exit's confidence
``confidence[n, e]`` under one measure and whether its top-1 token equals the final head's
``agrees[n, e]``, both from one no-cache forward over held-out text.

The policy for a threshold ``lambda`` is the decoder's: a token leaves at the first exit whose
confidence is ``>= lambda`` (or at the final head, which always agrees with itself). Its loss is
``1 - agrees[n, first exit]`` and the risk ``R(lambda)`` is its expectation.

One shared threshold, not one per exit. Reasons:

* It is what :class:`~megatron.early_exit.inference.decide.ExitPolicy` carries (one
  ``threshold``), so a calibrated value drops into the engine, the server and the benchmark.
* Fixed-sequence testing needs the hypotheses in one order, from the most conservative to the
  least; a single threshold gives that order for free. Per-exit thresholds form a
  multi-dimensional grid that LTT can only search with a Bonferroni correction or a graph of
  tests, both costly in power on a few thousand calibration tokens.
* CALM itself calibrates one threshold shared by its layers.

Procedure (Angelopoulos et al., "Learn then Test", 2021; Schuster et al., CALM, 2022):

1. A grid of thresholds fixed before seeing data, from 1.0 (most conservative) down to 0.
2. For each ``lambda`` in that order, the null hypothesis ``H: R(lambda) > epsilon``
   (``epsilon = 1 - target``) gets a p-value from the calibration losses: the exact binomial
   tail ``P(Binom(n, epsilon) <= n R_hat)`` (``"binomial"``, valid for 0/1 losses) or the
   Hoeffding-Bentkus bound (``"hoeffding_bentkus"``, valid for any loss in [0, 1], e.g. a
   per-sequence disagreement rate).
3. Fixed-sequence testing: reject while ``p <= delta`` and stop at the first failure; the last
   rejected ``lambda`` is returned. This controls the family-wise error at ``delta`` with no
   correction for the size of the grid, and needs no monotonicity of ``R`` (with several exits a
   lower threshold can move a token to an earlier, worse exit, so ``R`` is not monotone).
4. When even ``lambda = 1.0`` is not rejected, no threshold is certified: the result says
   "never exit" (``threshold = inf``, ``certified = False``) rather than a number that only
   looks calibrated; :func:`exit_policy_for` then refuses with an error naming the target.

Assumptions, stated (the guarantee holds only under them):

* Calibration units are i.i.d. draws of the test distribution. Tokens of one sequence are not
  independent; ``unit="sequence"`` makes the per-sequence disagreement rate the loss (i.i.d.
  sequences, Hoeffding-Bentkus), at the cost of power. ``unit="token"`` (the default) treats
  tokens as independent, as CALM's token-level consistency does.
* Per-token agreement on a fixed prefix approximates agreement of the decoded sequence. The
  calibration data compares exit and final head on the *same* prefix (teacher-forced text). In
  decoding, the first disagreeing token changes the prefix of every later token, so sequence-level
  consistency (position-wise token agreement after a divergence) can be lower than certified; the
  realised agreement on a separate test split (:func:`agreement_report`) and the benchmark's
  measured agreement are the check.
* KV recompute: tokens that exit early have their skipped layers' K/V computed later from the
  exited token, so their K/V are exact for the emitted prefix and the deep layers of later tokens
  see what full decoding would see *for that prefix*: later tokens' agreement depends on earlier
  exits only through the tokens emitted, which is the previous point. (State propagation, which
  copies the exit's state upward instead, would make later tokens' hidden states differ even on
  the same prefix; thresholds calibrated here do not cover it.)

Measured (``docs/exit_calibration_shortlist_sparse_kl.md``): on the tiny demo model, a
per-token certificate at 0.9 (0.917 on held-out continuations) gave 0.538 position-wise
agreement in decoding, because early exits steer the text into a region where the shallow exit
is confident. :func:`calibrate_by_decoding` certifies on decoded sequences instead (one decoding
pass per threshold tried) and is the one to trust for a claim about decoding; the per-token data
are a cheap way to look at candidates.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron.early_exit.inference.decide import (
    CONFIDENCE_MEASURES,
    DEFAULT_CONFIDENCE_MEASURE,
    ExitPolicy,
    confidence,
)

P_VALUE_METHODS = ("binomial", "hoeffding_bentkus")
UNITS = ("token", "sequence")
DEFAULT_GRID = tuple(round(1.0 - i / 1000, 3) for i in range(1001))
"""Thresholds tried, most conservative first: 1.000, 0.999, ..., 0.000 (fixed in advance)."""
NEVER_EXIT = math.inf
_CHUNK = 32


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


@dataclass
class CalibrationData:
    """Per-token, per-exit confidences and agreements (exits in increasing depth)."""

    depths: tuple[int, ...]
    confidence: torch.Tensor
    """``[n, num_exits]`` float32 confidence of each exit at each token."""
    agrees: torch.Tensor
    """``[n, num_exits]`` bool: the exit's top-1 token equals the final head's."""
    sequence_ids: torch.Tensor | None = None
    """``[n]`` long: which sequence (window) each token comes from (for ``unit="sequence"``)."""
    measure: str = DEFAULT_CONFIDENCE_MEASURE

    def __post_init__(self) -> None:
        self.depths = tuple(int(d) for d in self.depths)
        if not self.depths or list(self.depths) != sorted(set(self.depths)):
            raise ValueError(f"depths must be non-empty and strictly increasing: {self.depths}")
        shape = (self.confidence.shape[0], len(self.depths))
        if self.confidence.dim() != 2 or tuple(self.confidence.shape) != shape:
            raise ValueError(
                f"confidence must be [n, {len(self.depths)}], got {tuple(self.confidence.shape)}"
            )
        if tuple(self.agrees.shape) != shape:
            raise ValueError(f"agrees must be {list(shape)}, got {tuple(self.agrees.shape)}")
        if shape[0] == 0:
            raise ValueError("calibration data has no tokens")
        if self.sequence_ids is not None and tuple(self.sequence_ids.shape) != (shape[0],):
            raise ValueError(f"sequence_ids must be [{shape[0]}]")
        if self.measure not in CONFIDENCE_MEASURES:
            raise ValueError(f"measure must be one of {CONFIDENCE_MEASURES}, got {self.measure!r}")
        self.confidence = self.confidence.float()
        self.agrees = self.agrees.bool()

    @property
    def num_tokens(self) -> int:
        return self.confidence.shape[0]

    def split(self, fraction: float, seed: int = 0) -> tuple[CalibrationData, CalibrationData]:
        """``(calibration, test)``: a random split by sequence (by token without sequence ids),
        ``fraction`` of the sequences going to calibration."""
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"split fraction must be in (0, 1), got {fraction}")
        groups = self.sequence_ids if self.sequence_ids is not None else torch.arange(
            self.num_tokens)  # fmt: skip
        unique = torch.unique(groups)
        if len(unique) < 2:
            raise ValueError("need at least two sequences (or tokens) to split")
        order = unique[torch.randperm(len(unique), generator=torch.Generator().manual_seed(seed))]
        num_calibration = min(max(1, round(fraction * len(unique))), len(unique) - 1)
        in_calibration = torch.isin(groups, order[:num_calibration])
        return self._subset(in_calibration), self._subset(~in_calibration)

    def _subset(self, mask: torch.Tensor) -> CalibrationData:
        ids = self.sequence_ids[mask] if self.sequence_ids is not None else None
        return CalibrationData(
            self.depths, self.confidence[mask], self.agrees[mask], ids, self.measure
        )

    def save(self, path: str | Path) -> None:
        torch.save(
            {
                "depths": list(self.depths), "confidence": self.confidence,
                "agrees": self.agrees, "sequence_ids": self.sequence_ids,
                "measure": self.measure,
            },
            path,
        )  # fmt: skip

    @classmethod
    def load(cls, path: str | Path) -> CalibrationData:
        record = torch.load(path, map_location="cpu", weights_only=True)
        missing = {"depths", "confidence", "agrees"} - set(record)
        if missing:
            raise ValueError(f"{path}: not calibration data (missing {sorted(missing)})")
        return cls(
            tuple(record["depths"]), record["confidence"], record["agrees"],
            record.get("sequence_ids"), record.get("measure", DEFAULT_CONFIDENCE_MEASURE),
        )  # fmt: skip


@torch.no_grad()
def collect_calibration_data(
    model,
    windows: torch.Tensor,
    measure: str = DEFAULT_CONFIDENCE_MEASURE,
    batch_size: int = 1,
    from_position: int = 0,
) -> CalibrationData:
    """Confidences and agreements of every exit at every position of ``windows[n, s]`` (token
    ids), from megatron's own no-cache causal forward (single process, PP=1, all exits on).

    ``measure`` is any of ``CONFIDENCE_MEASURES``; ``"learned"`` reads the exits' confidence
    heads from the state each exit's output layer receives. Only positions ``>= from_position``
    are kept (e.g. the positions of a greedy continuation, see :func:`collect_on_generations`).
    """
    if measure not in CONFIDENCE_MEASURES:
        raise ValueError(f"measure must be one of {CONFIDENCE_MEASURES}, got {measure!r}")
    if windows.dim() != 2 or windows.shape[1] < 1:
        raise ValueError(f"windows must be [n, s] token ids, got {tuple(windows.shape)}")
    if not 0 <= from_position < windows.shape[1]:
        raise ValueError(f"from_position must be in [0, {windows.shape[1]}), got {from_position}")
    model.eval()
    depths = sorted(e.depth for e in model.local_exit_configs)
    if not depths:
        raise ValueError("the model has no exits to calibrate")
    heads = {d: model.exit_heads[str(d)] for d in depths}
    if measure == "learned":
        missing = [d for d in depths if getattr(heads[d], "confidence_head", None) is None]
        if missing:
            raise ValueError(f"measure 'learned' needs confidence heads; exits {missing} have none")
    captured: dict[int, torch.Tensor] = {}
    hooks = [
        heads[d].output_layer.register_forward_hook(
            lambda _module, args, _out, d=d: captured.__setitem__(d, args[0])
        )
        for d in depths
    ]
    confidences, agreements, sequence_ids = [], [], []
    try:
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start : start + batch_size]
            b, s = batch.shape
            mask = torch.ones(1, 1, s, s, dtype=torch.bool).triu(1)
            positions = torch.arange(s).unsqueeze(0).expand(b, -1)
            final, exits = model(batch, positions, mask, runtime_gather_output=True)
            final, kept = final[:, from_position:], s - from_position  # [b, kept, V]
            final_top1 = final.argmax(-1).reshape(-1)  # [b * kept]
            per_exit_conf, per_exit_agree = [], []
            for d in depths:
                logits = exits[d][:, from_position:].reshape(b * kept, -1)
                per_exit_agree.append(logits.argmax(-1) == final_top1)
                if measure == "learned":
                    states = captured[d][from_position:]  # [kept, b, h]
                    per_exit_conf.append(heads[d].confidence(states).transpose(0, 1).reshape(-1))
                else:
                    per_exit_conf.append(confidence(logits, measure))
            confidences.append(torch.stack(per_exit_conf, dim=1))  # [b * kept, num_exits]
            agreements.append(torch.stack(per_exit_agree, dim=1))
            sequence_ids.append(torch.arange(start, start + b).repeat_interleave(kept))
    finally:
        for hook in hooks:
            hook.remove()
    return CalibrationData(
        tuple(depths), torch.cat(confidences).float().cpu(), torch.cat(agreements).cpu(),
        torch.cat(sequence_ids), measure,
    )  # fmt: skip


@torch.no_grad()
def greedy_continuations(
    model, prompts: torch.Tensor, num_new_tokens: int, batch_size: int = 8
) -> torch.Tensor:
    """``prompts[n, s]`` followed by ``num_new_tokens`` greedy tokens of the final head each:
    ``[n, s + num_new_tokens]``, one no-cache forward per new token (full decoding's greedy
    output, without a KV cache), ``batch_size`` prompts at a time."""
    if num_new_tokens < 1:
        raise ValueError(f"num_new_tokens must be >= 1, got {num_new_tokens}")
    model.eval()
    out = []
    for start in range(0, prompts.shape[0], batch_size):
        sequences = prompts[start : start + batch_size]
        for _ in range(num_new_tokens):
            n, s = sequences.shape
            mask = torch.ones(1, 1, s, s, dtype=torch.bool).triu(1)
            positions = torch.arange(s).unsqueeze(0).expand(n, -1)
            final, _ = model(sequences, positions, mask, runtime_gather_output=True)
            sequences = torch.cat([sequences, final[:, -1].argmax(-1, keepdim=True)], dim=1)
        out.append(sequences)
    return torch.cat(out)


def collect_on_generations(
    model,
    prompts: torch.Tensor,
    num_new_tokens: int,
    measure: str = DEFAULT_CONFIDENCE_MEASURE,
    batch_size: int = 1,
) -> CalibrationData:
    """Calibration data on the model's own greedy continuations of ``prompts[n, s]``: only the
    positions that predict a generated token (and the one after), whose prefixes are exactly
    full decoding's. Closer to what early-exit decoding sees than teacher-forced text, whose
    exit confidences can differ a lot from those on generated text."""
    sequences = greedy_continuations(model, prompts, num_new_tokens, max(batch_size, 1))
    return collect_calibration_data(model, sequences, measure, batch_size, prompts.shape[1] - 1)


# ---------------------------------------------------------------------------------------------
# The policy on data
# ---------------------------------------------------------------------------------------------


def first_exit_index(confidence_values: torch.Tensor, threshold) -> torch.Tensor:
    """Index of the first exit with confidence ``>= threshold`` per token, ``num_exits`` for the
    final head: ``[n, num_exits] -> [n]``; with thresholds ``[g]``, ``[g, n]``."""
    thresholds = torch.as_tensor(threshold, dtype=confidence_values.dtype)
    fired = confidence_values >= thresholds.reshape(*thresholds.shape, 1, 1)  # [(g,) n, e]
    final = torch.ones(*fired.shape[:-1], 1, dtype=torch.bool)
    fired = torch.cat([fired, final], dim=-1)
    return fired.to(torch.uint8).argmax(dim=-1)  # the first maximum: the earliest exit


def token_losses(data: CalibrationData, threshold) -> torch.Tensor:
    """``[n]`` float64 (``[g, n]`` for thresholds ``[g]``): 1 where the token leaves at an exit
    that disagrees with the final head."""
    index = first_exit_index(data.confidence, threshold)
    agrees = torch.cat([data.agrees, torch.ones(data.num_tokens, 1, dtype=torch.bool)], dim=1)
    agrees = agrees.expand(*index.shape, agrees.shape[-1])
    return 1.0 - agrees.gather(-1, index.unsqueeze(-1)).squeeze(-1).double()


def unit_losses(data: CalibrationData, threshold, unit: str = "token") -> torch.Tensor:
    """Losses of the i.i.d. units LTT tests: per token, or per sequence (its disagreement
    rate); ``[units]``, or ``[g, units]`` for thresholds ``[g]``."""
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
    if unit == "sequence" and data.sequence_ids is None:
        raise ValueError("unit='sequence' needs calibration data with sequence_ids")
    losses = token_losses(data, threshold)
    if unit == "token":
        return losses
    _, inverse, counts = torch.unique(data.sequence_ids, return_inverse=True, return_counts=True)
    sums = torch.zeros(*losses.shape[:-1], len(counts), dtype=torch.float64)
    return sums.index_add_(-1, inverse, losses) / counts.double()


# ---------------------------------------------------------------------------------------------
# p-values
# ---------------------------------------------------------------------------------------------


def binomial_cdf(k: int, n: int, p: float) -> float:
    """``P(Binom(n, p) <= k)``, summed in log space (float64, no SciPy)."""
    if k < 0:
        return 0.0
    if k >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    i = torch.arange(k + 1, dtype=torch.float64)
    log_terms = (
        math.lgamma(n + 1) - torch.lgamma(i + 1) - torch.lgamma(n - i + 1)
        + i * math.log(p) + (n - i) * math.log1p(-p)
    )  # fmt: skip
    return min(1.0, float(torch.logsumexp(log_terms, dim=0).exp()))


def binomial_p_value(losses: torch.Tensor, epsilon: float) -> float:
    """p-value of ``H: E[loss] > epsilon`` for 0/1 losses: ``P(Binom(n, eps) <= sum(losses))``."""
    if not bool(((losses == 0) | (losses == 1)).all()):
        raise ValueError("the binomial p-value needs 0/1 losses; use 'hoeffding_bentkus'")
    return binomial_cdf(int(losses.sum()), losses.numel(), epsilon)


def _kl_bernoulli(a: float, b: float) -> float:
    def term(x: float, y: float) -> float:
        return 0.0 if x == 0.0 else x * math.log(x / y)

    return term(a, b) + term(1.0 - a, 1.0 - b)


def hoeffding_bentkus_p_value(losses: torch.Tensor, epsilon: float) -> float:
    """LTT's Hoeffding-Bentkus p-value of ``H: E[loss] > epsilon`` for losses in [0, 1]::

    min(exp(-n h(min(R_hat, eps), eps)), e * P(Binom(n, eps) <= ceil(n R_hat)))
    """
    n = losses.numel()
    if bool(((losses < 0) | (losses > 1)).any()):
        raise ValueError("Hoeffding-Bentkus needs losses in [0, 1]")
    risk = float(losses.mean())
    if epsilon >= 1.0:
        return 0.0
    hoeffding = math.exp(-n * _kl_bernoulli(min(risk, epsilon), epsilon))
    bentkus = math.e * binomial_cdf(math.ceil(n * risk - 1e-9), n, epsilon)
    return min(1.0, hoeffding, bentkus)


_P_VALUES = {"binomial": binomial_p_value, "hoeffding_bentkus": hoeffding_bentkus_p_value}


# ---------------------------------------------------------------------------------------------
# Learn then Test
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CalibratedThreshold:
    """What :func:`calibrate_threshold` certified."""

    threshold: float
    """The lowest certified threshold; ``inf`` ("never exit") when none is."""
    certified: bool
    target_agreement: float
    delta: float
    measure: str
    depths: tuple[int, ...]
    calibration_agreement: float
    """Token agreement of the policy on the calibration data (1.0 when never exiting)."""
    calibration_exit_rate: float
    """Share of calibration tokens that leave at an exit."""
    p_value: float
    """p-value of the returned threshold (of 1.0 when none is certified)."""
    num_units: int
    unit: str
    method: str
    reason: str = ""

    def thresholds_per_exit(self) -> dict[int, float]:
        """The (shared) threshold of each exit, keyed by depth."""
        return {depth: self.threshold for depth in self.depths}

    def as_dict(self) -> dict:
        """Fields as JSON-ready values (``inf`` as ``"inf"``, an unknown ``nan`` as None)."""
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        for key, value in out.items():
            if isinstance(value, float) and math.isnan(value):
                out[key] = None
            elif isinstance(value, float) and math.isinf(value):
                out[key] = "inf"
        out["depths"] = list(self.depths)
        return out


def _check_target(target_agreement: float, delta: float) -> None:
    if isinstance(target_agreement, bool) or not 0.0 < float(target_agreement) <= 1.0:
        raise ValueError(f"target_agreement must be in (0, 1], got {target_agreement!r}")
    if not 0.0 < float(delta) < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")


def calibrate_threshold(
    data: CalibrationData,
    target_agreement: float,
    delta: float = 0.1,
    *,
    grid: Sequence[float] = DEFAULT_GRID,
    unit: str = "token",
    method: str = "binomial",
) -> CalibratedThreshold:
    """The lowest threshold of ``grid`` (tested most conservative first) whose risk ``1 -
    agreement`` is certified ``<= 1 - target_agreement`` with probability ``1 - delta`` (fixed-
    sequence testing; see the module docstring). ``grid`` must be decreasing and start at or
    below 1.0."""
    _check_target(target_agreement, delta)
    if method not in _P_VALUES:
        raise ValueError(f"method must be one of {P_VALUE_METHODS}, got {method!r}")
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
    grid = [float(g) for g in grid]
    if not grid or any(b >= a for a, b in zip(grid, grid[1:])):
        raise ValueError("grid must be non-empty and strictly decreasing (most conservative first)")
    epsilon = 1.0 - float(target_agreement)
    p_value_of = _P_VALUES[method]
    chosen, chosen_p, first_p = NEVER_EXIT, 1.0, None
    for start in range(0, len(grid), _CHUNK):  # losses for a chunk of thresholds at once
        chunk = grid[start : start + _CHUNK]
        losses = unit_losses(data, torch.tensor(chunk), unit)  # [chunk, units]
        stopped = False
        for threshold, row in zip(chunk, losses):
            p = p_value_of(row, epsilon)
            first_p = p if first_p is None else first_p
            if p > delta:
                stopped = True
                break
            chosen, chosen_p = threshold, p
        if stopped:
            break
    certified = chosen != NEVER_EXIT
    num_units = unit_losses(data, grid[0], unit).numel()
    reason = "" if certified else (
        f"target agreement {target_agreement} at delta {delta} is not certifiable on "
        f"{num_units} {unit}s: even threshold {grid[0]} has p-value {first_p:.3g} > {delta} "
        "(never exit: use full decoding, lower the target, or calibrate on more data)"
    )  # fmt: skip
    index = first_exit_index(data.confidence, chosen)
    return CalibratedThreshold(
        threshold=chosen, certified=certified, target_agreement=float(target_agreement),
        delta=float(delta), measure=data.measure, depths=data.depths,
        calibration_agreement=1.0 - float(token_losses(data, chosen).mean()),
        calibration_exit_rate=float((index < len(data.depths)).double().mean()),
        p_value=chosen_p, num_units=num_units, unit=unit, method=method, reason=reason,
    )  # fmt: skip


DECODE_GRID = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.15, 0.1, 0.07, 0.05, 0.03, 0.02,
               0.01, 0.005, 0.0)  # fmt: skip
"""Thresholds tried by :func:`calibrate_by_decoding` (each costs a decoding run), fixed in
advance, most conservative first."""


def calibrate_by_decoding(
    sequence_losses: Callable[[float], torch.Tensor],
    target_agreement: float,
    delta: float = 0.1,
    *,
    grid: Sequence[float] = DECODE_GRID,
    measure: str = DEFAULT_CONFIDENCE_MEASURE,
    depths: Sequence[int] = (),
) -> CalibratedThreshold:
    """Learn-then-Test on *decoded* sequences: no per-token proxy (assumption 2 of the module
    docstring is not needed).

    ``sequence_losses(threshold)`` decodes the calibration prompts with early exit at
    ``threshold`` and returns ``[num_prompts]`` losses in [0, 1], e.g. ``1 -`` the position-wise
    agreement of each prompt's output with full decoding's. Prompts are the i.i.d. units; the
    p-value is Hoeffding-Bentkus. Thresholds are decoded in ``grid`` order and decoding stops at
    the first one not certified, so a run costs one decoding pass per certified threshold + 1.
    """
    _check_target(target_agreement, delta)
    grid = [float(g) for g in grid]
    if not grid or any(b >= a for a, b in zip(grid, grid[1:])):
        raise ValueError("grid must be non-empty and strictly decreasing (most conservative first)")
    epsilon = 1.0 - float(target_agreement)
    chosen, chosen_p, first_p, chosen_risk, num_units = NEVER_EXIT, 1.0, None, 0.0, 0
    for threshold in grid:
        losses = sequence_losses(threshold).double()
        if losses.dim() != 1 or losses.numel() == 0:
            raise ValueError(
                f"sequence_losses must return [num_prompts], got {tuple(losses.shape)}"
            )
        num_units = losses.numel()
        p = hoeffding_bentkus_p_value(losses, epsilon)
        first_p = p if first_p is None else first_p
        if p > delta:
            break
        chosen, chosen_p, chosen_risk = threshold, p, float(losses.mean())
    certified = chosen != NEVER_EXIT
    reason = "" if certified else (
        f"target agreement {target_agreement} at delta {delta} is not certifiable on "
        f"{num_units} decoded sequences: even threshold {grid[0]} has p-value {first_p:.3g} > "
        f"{delta} (never exit: use full decoding, lower the target, or use more prompts)"
    )  # fmt: skip
    return CalibratedThreshold(
        threshold=chosen, certified=certified, target_agreement=float(target_agreement),
        delta=float(delta), measure=measure, depths=tuple(depths),
        calibration_agreement=1.0 - chosen_risk, calibration_exit_rate=math.nan,
        p_value=chosen_p, num_units=num_units, unit="decoded sequence",
        method="hoeffding_bentkus", reason=reason,
    )  # fmt: skip


def exit_policy_for(result: CalibratedThreshold, depths: Sequence[int] | None = None) -> ExitPolicy:
    """The :class:`ExitPolicy` of a calibrated threshold (its measure, the calibrated exits).
    Raises ``ValueError`` when nothing was certified (no policy exits safely)."""
    if not result.certified:
        raise ValueError(result.reason or "no threshold was certified")
    return ExitPolicy(
        threshold=result.threshold, measure=result.measure,
        depths=frozenset(depths if depths is not None else result.depths),
    )  # fmt: skip


def threshold_for_target(
    data: CalibrationData, target_agreement: float, delta: float = 0.1, **kwargs
) -> dict[int, float]:
    """``{depth: threshold}`` for ``ExitPolicy`` (one shared value; see the module docstring);
    ``inf`` at every exit when the target cannot be certified."""
    return calibrate_threshold(data, target_agreement, delta, **kwargs).thresholds_per_exit()


# ---------------------------------------------------------------------------------------------
# Report on a test split
# ---------------------------------------------------------------------------------------------


@dataclass
class AgreementReport:
    """The policy at one threshold on (test) data."""

    threshold: float
    agreement: float
    """Realised token agreement with the final head."""
    exit_rate: float
    exit_share: dict[int, float] = field(default_factory=dict)
    """Share of tokens leaving at each exit depth."""
    mean_depth_fraction: float = 1.0
    """Mean exit depth / ``num_layers`` (1.0 when ``num_layers`` is not given)."""
    num_tokens: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def agreement_report(
    data: CalibrationData, threshold: float, num_layers: int | None = None
) -> AgreementReport:
    """Realised agreement and exit use of the policy at ``threshold`` on ``data`` (a test split
    never used for calibration)."""
    index = first_exit_index(data.confidence, threshold)
    num_exits = len(data.depths)
    counts = torch.bincount(index, minlength=num_exits + 1).double() / data.num_tokens
    share = {d: float(counts[i]) for i, d in enumerate(data.depths)}
    depth_fraction = 1.0
    if num_layers is not None:
        depths = torch.tensor([*data.depths, num_layers], dtype=torch.float64)
        depth_fraction = float((depths[index] / num_layers).mean())
    return AgreementReport(
        threshold=threshold, agreement=1.0 - float(token_losses(data, threshold).mean()),
        exit_rate=float(counts[:num_exits].sum()), exit_share=share,
        mean_depth_fraction=depth_fraction, num_tokens=data.num_tokens,
    )  # fmt: skip
