"""Sparse KL against the dense distillation KL (``losses.vocab_parallel_kl_divergence``)."""

from __future__ import annotations

import pytest
import torch

from megatron.early_exit.model.losses import (
    vocab_parallel_kl_divergence,
    vocab_parallel_log_softmax,
)
from megatron.early_exit.model.sparse_kl import sparse_exit_kl, teacher_top_k

N, H, V = 24, 16, 96


def _inputs(seed: int, n: int = N, h: int = H, v: int = V, zipf: float = 0.0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(v, h, generator=generator, dtype=torch.float64) * 0.3
    states = torch.randn(n, h, generator=generator, dtype=torch.float64)
    # A unigram-like bias makes the teacher's distribution heavy-headed, as a language model's is.
    bias = -zipf * torch.log1p(torch.randperm(v, generator=generator).double())
    teacher = (
        states @ weight.t() + bias + torch.randn(n, v, generator=generator, dtype=torch.float64)
    )
    return states, weight, teacher


def _dense(states, weight, teacher, temperature=1.0):
    student = (states @ weight.t()) / temperature
    return vocab_parallel_kl_divergence(vocab_parallel_log_softmax(teacher), student)


@pytest.mark.parametrize("num_sampled", [0, 32])
@pytest.mark.parametrize("temperature", [1.0, 1.5])
def test_equals_the_dense_kl_and_its_gradient_when_k_is_the_vocabulary(num_sampled, temperature):
    states, weight, teacher = _inputs(0)
    ids, log_probs = teacher_top_k(teacher, V)
    grads = []
    for fn in (
        lambda s, w: _dense(s, w, teacher, temperature),
        lambda s, w: sparse_exit_kl(s, w, ids, log_probs, num_sampled, temperature=temperature),
    ):
        s, w = states.clone().requires_grad_(), weight.clone().requires_grad_()
        kl = fn(s, w)
        (kl * torch.linspace(0.5, 1.5, N, dtype=kl.dtype)).sum().backward()
        grads.append((kl.detach().double(), s.grad, w.grad))
    (dense, dense_s, dense_w), (sparse, sparse_s, sparse_w) = grads
    torch.testing.assert_close(sparse, dense, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sparse_s.double(), dense_s.double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sparse_w.double(), dense_w.double(), rtol=1e-6, atol=1e-6)


def test_approximation_error_falls_with_k_on_a_heavy_headed_distribution(capsys):
    """Report (pytest -s) and bound the error of smaller k on a Zipf-like teacher, V = 2048."""
    v = 2048
    states, weight, teacher = _inputs(1, n=64, h=32, v=v, zipf=1.2)
    student = states @ weight.t()
    teacher = teacher * 0.5 + student  # a student that roughly follows the teacher
    dense = _dense(states, weight, teacher).double()
    lines, errors = [f"dense KL mean {float(dense.mean()):.4f} (V={v})"], {}
    for num_sampled in (0, 256):
        for k in (8, 32, 128, 512):
            ids, log_probs = teacher_top_k(teacher, k)
            generator = torch.Generator().manual_seed(0)
            sparse = sparse_exit_kl(
                states, weight, ids, log_probs, num_sampled, generator=generator
            )
            mass = float(log_probs.exp().sum(-1).mean())
            error = float((sparse.double() - dense).abs().mean() / dense.mean())
            errors[num_sampled, k] = error
            lines.append(f"k={k:4d} m={num_sampled:3d} teacher mass {mass:.3f} rel err {error:.4f}")
    print("\n".join(lines))
    for m in (0, 256):
        assert errors[m, 512] < errors[m, 8]
    assert errors[256, 128] < 0.1 and errors[256, 512] < 0.02
    # The rest bucket helps when the top-k misses mass.
    assert errors[256, 8] < errors[0, 8]


def test_bad_inputs_are_named():
    states, weight, teacher = _inputs(2)
    ids, log_probs = teacher_top_k(teacher, 4)
    with pytest.raises(ValueError, match="k must be in"):
        teacher_top_k(teacher, V + 1)
    with pytest.raises(ValueError, match="teacher ids must lie in"):
        sparse_exit_kl(states, weight[:10], ids.clamp_min(50), log_probs)
    with pytest.raises(ValueError, match=r"states \[N, h\] and output_weight"):
        sparse_exit_kl(states[:, :3], weight, ids, log_probs)
    with pytest.raises(ValueError, match="num_sampled"):
        sparse_exit_kl(states, weight, ids, log_probs, -1)


def test_timing_script_times_dense_and_sparse(capsys):
    from megatron.early_exit.bench.sparse_kl import main

    argv = ["--hidden", "8", "--vocab", "64", "--tokens", "4", "--ks", "8", "64", "--rounds", "1"]
    timings = main(argv)
    assert list(timings) == ["dense", "sparse k=8 m=256", "sparse k=64 m=256"]
    assert timings["sparse k=64 m=256"]["relative_kl_error"] < 1e-5  # k = V: exact
    assert "tokens/s" in capsys.readouterr().out
