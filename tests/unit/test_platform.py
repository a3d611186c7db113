"""Every claim about megatron-core on CPU that the platform layer relies on, verified.

Each check runs in a fresh interpreter: the compatibility layer patches torch process-wide, and
these tests must see the unpatched state too.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")


def run_python(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_megatron_core_version_is_pinned_and_patch_targets_exist():
    out = run_python(
        """
        from importlib.metadata import version
        import megatron.core.tensor_parallel.random as r
        from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer as D
        print(version("megatron-core"))
        for name in ("_get_cuda_rng_state", "_set_cuda_rng_state"):
            assert hasattr(r, name), name
        for name in ("_set_main_param_and_optimizer_states", "load_state_dict"):
            assert hasattr(D, name), name
        """
    )
    assert out.strip() == "0.16.1"


def test_importing_has_no_side_effects():
    run_python(
        """
        import torch
        import megatron.early_exit.platform as p, megatron.early_exit.model.gpt_model
        assert not p.cpu_compat_installed()
        try:
            torch.zeros(1, device="cuda")
        except (RuntimeError, AssertionError):
            pass
        else:
            raise SystemExit("torch was patched at import time")
        """
    )


def test_without_compat_megatron_rng_seeding_fails_on_cpu():
    """The claim the RNG patch rests on: model_parallel_cuda_manual_seed raises on a CPU build."""
    run_python(
        """
        try:
            from megatron.core.tensor_parallel import random as r
            r.model_parallel_cuda_manual_seed(1, tp_rank=0, ep_rank=0, etp_rank=0)
        except (RuntimeError, AssertionError) as e:
            print("raised", e)
        else:
            raise SystemExit("expected a failure without the compatibility layer")
        """
    )


def test_compat_layer_remaps_literals_and_answers_type_only_to_megatron():
    out = run_python(
        """
        import torch
        from megatron.early_exit import platform
        assert platform.install_cpu_compat() and platform.install_cpu_compat()  # idempotent
        assert torch.zeros(2, device="cuda").device.type == "cpu"
        assert torch.ones(2).to("cuda:0").device.type == "cpu"
        assert torch.cuda.current_device() == torch.device("cpu")
        x = torch.zeros(2)
        assert x.type() == "torch.FloatTensor"          # our frames see the truth
        ns = {"__name__": "megatron.core.fake", "x": x}
        exec("t = x.type()", ns)
        print(ns["t"])
        """
    )
    assert out.strip() == "torch.cuda.FloatTensor"


def test_device_contexts_still_apply_to_wrapped_factories():
    """transformers' from_pretrained builds on the meta device through ``with torch.device``;
    the wrapped factories must still honour it (it silently built CPU tensors before the fix)."""
    run_python(
        """
        import torch
        from megatron.early_exit import platform
        platform.install_cpu_compat()
        with torch.device("meta"):
            devices = {torch.tensor([]).device.type, torch.empty(2).device.type,
                       torch.zeros(2).device.type, torch.arange(3).device.type}
        assert devices == {"meta"}, devices
        """
    )


def test_rng_tracker_streams_differ_and_fork_is_reproducible():
    """On a CPU build megatron's RNG setters are silent no-ops; with the layer they work, so the
    model-parallel stream differs from the default one and replays identically after reseeding."""
    run_python(
        """
        import torch
        from megatron.early_exit import platform
        platform.install_cpu_compat()
        from megatron.core.tensor_parallel import random as r
        def draws():
            r.model_parallel_cuda_manual_seed(123, tp_rank=0, ep_rank=0, etp_rank=0)
            default = torch.rand(4)
            with r.get_cuda_rng_tracker().fork():
                tp = torch.rand(4)
            return default, tp
        d1, t1 = draws()
        d2, t2 = draws()
        assert torch.equal(d1, d2) and torch.equal(t1, t2), "not reproducible"
        assert not torch.equal(d1, t1), "tracker streams are identical"
        r.model_parallel_cuda_manual_seed(123, tp_rank=1, ep_rank=0, etp_rank=0)
        with r.get_cuda_rng_tracker().fork():
            t_rank1 = torch.rand(4)
        assert not torch.equal(t1, t_rank1), "TP ranks share a stream"
        """
    )


def test_stock_torch_norm_refuses_sequence_parallel_and_ours_tags_params():
    run_python(
        """
        from megatron.core.transformer import TransformerConfig
        from megatron.core.transformer.torch_norm import WrappedTorchNorm
        from megatron.early_exit.model.layer_specs import SequenceParallelTorchNorm
        cfg = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2,
                                tensor_model_parallel_size=2, sequence_parallel=True,
                                normalization="RMSNorm")
        try:
            WrappedTorchNorm(cfg, 8)
        except AssertionError:
            pass
        else:
            raise SystemExit("stock norm accepted sequence parallelism")
        norm = SequenceParallelTorchNorm(cfg, 8)
        assert all(p.sequence_parallel for p in norm.parameters())
        """
    )


def test_single_process_initialize_and_forward():
    out = run_python(
        """
        import torch
        from megatron.early_exit import platform
        from megatron.early_exit.model.builder import build_early_exit_model
        from tests.helpers import tiny_config, make_batch, VOCAB, SEQ
        if __name__ == "__main__":
            import datetime
            import torch.distributed as dist
            from megatron.core import parallel_state
            seen = {}
            def recording(fn, key):
                def wrapper(*args, **kwargs):
                    seen[key] = kwargs
                    return fn(*args, **kwargs)
                return wrapper
            dist.init_process_group = recording(dist.init_process_group, "pg")
            parallel_state.initialize_model_parallel = recording(
                parallel_state.initialize_model_parallel, "groups")
            layout = platform.initialize(1, 1, seed=1, timeout_s=90)  # 1.5 minutes
            assert seen["pg"]["timeout"] == datetime.timedelta(seconds=90), seen
            assert seen["groups"]["distributed_timeout_minutes"] == 1.5, seen
            assert layout.world_size == 1 and platform.distributed_backend() == "gloo"
            model = build_early_exit_model(tiny_config("gpt"), VOCAB, SEQ, seed=1)
            b = make_batch(0)
            loss, exits = model(b["input_ids"], b["position_ids"], b["attention_mask"],
                                labels=b["labels"])
            print(sorted(exits), tuple(loss.shape))
            platform.destroy()
        """
    )
    assert out.strip().splitlines()[-1] == "[1, 2, 3, 4] (2, 16)"
