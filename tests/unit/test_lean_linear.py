"""The lean step's CPU linears: weights held transposed, refreshed when the parameter changes."""

import torch
import torch.nn.functional as F

from megatron.early_exit.inference.lean import Linear, transposed


def test_linear_equals_f_linear_with_and_without_bias():
    torch.manual_seed(0)
    weight, bias = torch.randn(40, 16), torch.randn(40)
    for shape in [(1, 12, 16), (7, 3, 16), (1, 1, 16)]:
        x = torch.randn(*shape)
        torch.testing.assert_close(Linear(weight)(x), F.linear(x, weight), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(
            Linear(weight, bias)(x), F.linear(x, weight, bias), rtol=1e-6, atol=1e-6
        )


def test_transposed_copy_is_cached_and_follows_in_place_updates():
    weight = torch.nn.Parameter(torch.randn(8, 4))
    first = transposed(weight)
    assert first.is_contiguous() and torch.equal(first, weight.detach().t())
    assert transposed(weight) is first  # cached while the parameter is unchanged
    with torch.no_grad():
        weight.mul_(2.0)  # an optimizer step / load_state_dict: the version moves
    second = transposed(weight)
    assert second is not first and torch.equal(second, weight.detach().t())
    with torch.no_grad():
        weight.copy_(torch.zeros(8, 4))
    assert torch.equal(Linear(weight)(torch.ones(1, 4)), torch.zeros(1, 8))


def test_transposed_copy_follows_updates_that_bypass_the_version_counter():
    """Megatron's distributed optimizer writes parameters through their buffers (``.data``
    views): the version does not move, the copy must follow anyway."""
    weight = torch.nn.Parameter(torch.randn(8, 4))
    first = transposed(weight)
    version = weight._version
    weight.data.copy_(torch.randn(8, 4))
    assert weight._version == version
    assert torch.equal(transposed(weight), weight.detach().t())
    assert torch.equal(Linear(weight)(torch.eye(4)), weight.detach().t())
    assert not torch.equal(transposed(weight), first)
