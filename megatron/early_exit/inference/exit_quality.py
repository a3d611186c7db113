"""How good each exit is on held-out text: perplexity and top-1 agreement with the final head.

For every window of ``s + 1`` tokens the model runs one no-cache forward (megatron's own, all
exits on) and, at each of the ``s`` positions, compares each exit with the labels (cross
entropy) and with the final head (does the exit's top-1 token equal the final head's?). Exits
with a learned confidence head also report how well it predicts that agreement: the mean
predicted probability, the share of tokens it classifies right at 0.5, and its ROC AUC.
Every head also reports the temperature of :data:`TEMPERATURES` whose scaled logits have the
lowest cross entropy (what ``--exit-temperature-init`` of the checkpoint tools takes): a
pretrained model's logit lens is badly overconfident mid-network.

Agreement is the quantity early exit trades against speed: a token that exits at an exit whose
top-1 equals the final head's is what full decoding would have produced (greedy).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

FINAL = "final"
TEMPERATURES = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)


@dataclass
class HeadQuality:
    """One head's numbers over every evaluated position."""

    head: str
    """Exit depth as a string, or ``"final"``."""
    loss: float
    perplexity: float
    agreement: float
    """Share of positions whose top-1 token equals the final head's (1.0 for the final head)."""
    tokens: int
    confidence_mean: float | None = None
    confidence_accuracy: float | None = None
    confidence_auc: float | None = None
    best_temperature: float = 1.0
    """The temperature of :data:`TEMPERATURES` with the lowest cross entropy of logits / T."""
    best_temperature_loss: float = math.nan

    def as_dict(self) -> dict:
        return asdict(self)


def roc_auc(scores: torch.Tensor, positives: torch.Tensor) -> float | None:
    """Probability that a random positive scores above a random negative (ties count half)."""
    positives = positives.bool()
    num_pos, num_neg = int(positives.sum()), int((~positives).sum())
    if num_pos == 0 or num_neg == 0:
        return None
    order = torch.argsort(scores.double())
    ranks = torch.empty(len(scores), dtype=torch.float64)
    sorted_scores = scores.double()[order]
    # average ranks over ties
    unique, inverse, counts = torch.unique_consecutive(
        sorted_scores, return_inverse=True, return_counts=True
    )
    ends = torch.cumsum(counts, 0).double()
    average = ends - (counts.double() - 1) / 2
    ranks[order] = average[inverse]
    return float((ranks[positives].sum() - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg))


@torch.no_grad()
def exit_quality(model, windows: torch.Tensor, batch_size: int = 1) -> list[HeadQuality]:
    """Per-head quality over ``windows[n, s + 1]`` token ids (single process, PP=1)."""
    model.eval()
    depths = sorted(e.depth for e in model.local_exit_configs)
    captured: dict[int, torch.Tensor] = {}
    hooks = [
        model.exit_heads[str(d)].output_layer.register_forward_hook(
            lambda _module, args, _out, d=d: captured.__setitem__(d, args[0])
        )
        for d in depths
    ]
    sums = {
        key: {"loss": 0.0, "agree": 0, "conf": [], "hit": [], "scaled": [0.0] * len(TEMPERATURES)}
        for key in [*map(str, depths), FINAL]
    }
    count = 0
    try:
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start : start + batch_size]
            inputs, labels = batch[:, :-1], batch[:, 1:]
            b, s = inputs.shape
            mask = torch.ones(1, 1, s, s, dtype=torch.bool).triu(1)
            positions = torch.arange(s).unsqueeze(0).expand(b, -1)
            final, exits = model(inputs, positions, mask, runtime_gather_output=True)
            final_top1 = final.argmax(-1)
            heads = {FINAL: final, **{str(d): exits[d] for d in depths}}
            for key, logits in heads.items():
                shape = logits.shape
                logits = logits.float().reshape(-1, shape[-1])
                targets = labels.reshape(-1)
                loss = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
                for i, temperature in enumerate(TEMPERATURES):
                    sums[key]["scaled"][i] += float(
                        torch.nn.functional.cross_entropy(
                            logits / temperature, targets, reduction="sum"
                        )
                    )
                logits = logits.view(shape)
                agree = logits.argmax(-1) == final_top1
                sums[key]["loss"] += float(loss)
                sums[key]["agree"] += int(agree.sum())
                if key != FINAL:
                    head = model.exit_heads[key]
                    if getattr(head, "confidence_head", None) is not None:
                        states = captured[int(key)]  # [s, b, h]
                        sums[key]["conf"].append(head.confidence(states).transpose(0, 1).flatten())
                        sums[key]["hit"].append(agree.flatten())
            count += b * s
    finally:
        for hook in hooks:
            hook.remove()
    out = []
    for key, values in sums.items():
        loss = values["loss"] / count
        quality = HeadQuality(
            head=key,
            loss=loss,
            perplexity=math.exp(min(loss, 50.0)),
            agreement=values["agree"] / count,
            tokens=count,
        )
        scaled = [total / count for total in values["scaled"]]
        best = min(range(len(TEMPERATURES)), key=scaled.__getitem__)
        quality.best_temperature, quality.best_temperature_loss = TEMPERATURES[best], scaled[best]
        if values["conf"]:
            conf, hit = torch.cat(values["conf"]), torch.cat(values["hit"])
            quality.confidence_mean = float(conf.mean())
            quality.confidence_accuracy = float(((conf >= 0.5) == hit).float().mean())
            quality.confidence_auc = roc_auc(conf, hit)
        out.append(quality)
    return out


def token_windows(
    token_ids: list[int], length: int, max_windows: int | None = None
) -> torch.Tensor:
    """Non-overlapping windows ``[n, length]`` of a token stream (the tail that does not fill a
    window is dropped)."""
    n = len(token_ids) // length
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"{len(token_ids)} tokens do not fill one window of {length}")
    return torch.tensor(token_ids[: n * length], dtype=torch.long).view(n, length)


def format_table(rows: list[HeadQuality], title: str = "") -> str:
    lines = [title] if title else []
    lines.append(
        f"{'head':>6} {'loss':>8} {'ppl':>10} {'agree':>7} {'conf':>6} {'acc':>6} {'auc':>6}"
        f" {'best T':>6} {'loss@T':>8}"
    )
    for r in rows:
        conf = (
            f"{r.confidence_mean:6.3f} {r.confidence_accuracy:6.3f} "
            f"{r.confidence_auc if r.confidence_auc is not None else float('nan'):6.3f}"
            if r.confidence_mean is not None
            else f"{'-':>6} {'-':>6} {'-':>6}"
        )
        lines.append(
            f"{r.head:>6} {r.loss:8.4f} {r.perplexity:10.2f} {r.agreement:7.3f} {conf}"
            f" {r.best_temperature:6.1f} {r.best_temperature_loss:8.4f}"
        )
    return "\n".join(lines)
