"""The optimizer side of checkpoints: which optimizer saved, and megatron-core's
distributed-optimizer checkpoint fix for torch AdamW."""

from __future__ import annotations

import torch

from megatron.early_exit import platform
from megatron.early_exit.checkpoint.record import CheckpointError, CheckpointInfo


def _megatron_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def optimizer_kind(optimizer) -> str:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    chain = _megatron_optimizers(optimizer)
    return "distributed" if any(isinstance(o, DistributedOptimizer) for o in chain) else "plain"


def has_state(optimizer) -> bool:
    """True when the optimizer has state on any rank (a rank may hold no parameters: a
    distributed-optimizer shard, a frozen stage)."""
    local = any(len(o.optimizer.state) > 0 for o in _megatron_optimizers(optimizer))
    flag = torch.tensor([int(local)], device=platform.device())
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def check_optimizer_kind(info: CheckpointInfo, optimizer) -> None:
    kind = optimizer_kind(optimizer)
    if info.optimizer != kind:
        raise CheckpointError(
            f"checkpoint {info.path} holds the {info.optimizer} optimizer's state, this run uses "
            f"the {kind} optimizer; pass load_optimizer=False (--no-load-optim) to load the model "
            "only"
        )


def create_distributed_optimizer_state(optimizer) -> None:
    """The fully-reshardable load writes into existing torch optimizer state (without it
    ``DistributedOptimizer.state_dict`` fails on ``assert len(steps) == 1``): create it with
    megatron-core's own dummy step. The load overwrites params and state afterwards."""
    for opt in _megatron_optimizers(optimizer):
        if len(opt.optimizer.state) == 0:
            opt._init_optimizer_states_with_dummy_values()


_DISTOPT_FIX_APPLIED = False


def apply_distributed_optimizer_checkpoint_fix() -> bool:
    """Patch megatron-core 0.16.1's DistributedOptimizer checkpoint path for torch AdamW.

    Only without TE/Apex (their fused Adam keeps ``step`` per param group, and megatron-core's
    own code path is right there). Three bugs in ``distrib_optimizer.py``:

    1. ``_set_main_param_and_optimizer_states`` copies into ``optim_state['step']``, which the
       fully-reshardable checkpoint never contains (KeyError);
    2. for fp32 params the main param is a view of a leaf that requires grad, so the ``copy_``
       outside ``no_grad`` raises;
    3. ``load_state_dict`` gives every param *one shared* ``step`` tensor, which torch AdamW then
       increments once per param per step: the bias correction is wrong after a resume and the
       run silently diverges (the resume test catches this).

    Idempotent; returns True when the patch is (now) installed.
    """
    global _DISTOPT_FIX_APPLIED
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return False
    if _DISTOPT_FIX_APPLIED:
        return True
    cls = distrib_optimizer.DistributedOptimizer
    original_set = cls._set_main_param_and_optimizer_states
    original_load = cls.load_state_dict

    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return original_set(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        with torch.no_grad():  # bug 2
            targets = {"param": main_param, **self.optimizer.state[main_param]}
            for key, target in targets.items():
                if key in tensors:  # bug 1: no "step" in the checkpoint
                    target.copy_(tensors[key])

    def load_state_dict(self, state_dict):
        result = original_load(self, state_dict)
        for param_state in self.optimizer.state.values():  # bug 3: one step tensor per param
            if isinstance(param_state.get("step"), torch.Tensor):
                param_state["step"] = param_state["step"].clone()
        return result

    cls._set_main_param_and_optimizer_states = _set_main_param_and_optimizer_states
    cls.load_state_dict = load_state_dict
    _DISTOPT_FIX_APPLIED = True
    return True
