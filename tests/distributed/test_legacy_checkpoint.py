"""Importing EE-LLM's legacy checkpoints (``iter_N/mp_rank_TT_PPP/model_optim_rng.pt``).

One spawned rank builds tiny models of ours, writes each as a legacy EE-LLM checkpoint at TP=2,
PP=2 with the writer below, runs the importer (:mod:`megatron.early_exit.checkpoint.legacy`),
loads the converted checkpoint and compares the final and every exit's logits with the model it
came from (fp32, 1e-5). The writer is the inverse mapping written from the EE-LLM inventory
(``shared/reference/ee-llm-inventory.md``) and EE-LLM's ``saver_megatron.py`` key layout, not
the importer's code: nested ``language_model.{embedding,encoder,output_layer,
exit_output_layer}`` dicts, stage-local layer and untied-exit indices, per-rank vocab and QKV
rows, per-rank ``[gate; up]`` SwiGLU rows, ``word_embeddings_for_head`` on later stages of tied
models, the branch MLP of EE-LLM's MLP exits inside the exit layer.

Cases: a tied LayerNorm/GPT model with the older Megatron norm names and tied norm exits on both
stages; an untied RMSNorm/SwiGLU/GQA/RoPE model with untied block exits (two on stage 0, so the
stage-local index matters); EE-LLM MLP exits (our block pre-exits sharing layer L's attention);
tied head-only pre-exits. Two converted checkpoints are then loaded by two ranks at TP=2 and at
PP=2 and give the same logits. Then the refusals, and the CLI end to end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed.harness import run_distributed

TOL = 1e-5
TP, PP = 2, 2
NUM_LAYERS = 4
PER_STAGE = NUM_LAYERS // PP
ITERATION = 2400
REPO = Path(__file__).resolve().parents[2]

# name -> (family of tests.helpers, legacy exit flags, exit layers, older norm names)
CASES = {
    "tied_norm": ("gpt", dict(use_exit_norm=True), [1, 3], True),
    "untied_block": ("llama", dict(use_exit_norm=True, use_exit_block=True), [1, 2, 4], False),
    "untied_mlp": ("llama", dict(use_exit_norm=True, use_exit_mlp=True), [2, 3], False),
    "tied_pre_head": ("gpt", dict(pre_exit=True), [2, 3], False),
}


# ---------------------------------------------------------------------------------------------
# Our source models
# ---------------------------------------------------------------------------------------------


def _our_exits(case: str):
    from megatron.early_exit.config import ExitHeadConfig

    family, flags, layers, _ = CASES[case]
    untied = family == "llama"
    weights = [0.25 * (i + 1) for i in range(len(layers))]
    structure = {"tied_norm": "norm", "untied_block": "block", "untied_mlp": "block",
                 "tied_pre_head": "head"}[case]  # fmt: skip
    pre = flags.get("pre_exit", False) or case == "untied_mlp"
    return tuple(
        ExitHeadConfig(n, pre_exit=pre, structure=structure, loss_weight=w, untied=untied,
                       loss_weight_init=0.1, temperature=1.5 if i == 0 else 1.0)
        for i, (n, w) in enumerate(zip(layers, weights, strict=True))
    )  # fmt: skip


def _source_model(case: str):
    from megatron.early_exit.model.builder import build_early_exit_model, reproducible_init_
    from tests.helpers import SEQ, VOCAB, position_embedding_type, tiny_config

    family = CASES[case][0]
    config = tiny_config(family, exit_heads=_our_exits(case), dynamic_exit_loss_weight=False)
    model = build_early_exit_model(
        config, VOCAB, SEQ, position_embedding_type=position_embedding_type(family)
    )
    reproducible_init_(model, seed=11, norm_jitter=0.2)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
        if case == "untied_mlp":  # EE-LLM's MLP exit shares layer L's norm and attention
            sd = model.state_dict()
            for head in config.exit_heads:
                layer = f"decoder.layers.{head.layer_number - 1}."
                mine = f"exit_heads.{head.depth}.layer."
                for name in ("input_layernorm.weight", "pre_mlp_layernorm.weight",
                             "self_attention.linear_qkv.weight",
                             "self_attention.linear_proj.weight"):  # fmt: skip
                    sd[mine + name].copy_(sd[layer + name])
    model.eval()
    return config, model


# ---------------------------------------------------------------------------------------------
# The legacy writer (inverse of the importer, written independently)
# ---------------------------------------------------------------------------------------------


def _legacy_args(case: str, config) -> argparse.Namespace:
    from tests.helpers import SEQ, VOCAB, position_embedding_type

    family, flags, layers, _ = CASES[case]
    llama = family == "llama"
    exits = {e.layer_number: e for e in config.exit_heads}
    args = argparse.Namespace(
        num_layers=NUM_LAYERS, hidden_size=config.hidden_size,
        ffn_hidden_size=config.ffn_hidden_size, num_attention_heads=config.num_attention_heads,
        group_query_attention=llama, num_query_groups=config.num_query_groups if llama else 1,
        kv_channels=config.kv_channels, max_position_embeddings=SEQ, seq_length=SEQ,
        padded_vocab_size=VOCAB, tensor_model_parallel_size=TP, pipeline_model_parallel_size=PP,
        normalization=config.normalization, norm_epsilon=config.layernorm_epsilon,
        apply_layernorm_1p=False, swiglu=llama, add_bias_linear=config.add_bias_linear,
        openai_gelu=False, squared_relu=False, onnx_safe=None,
        untie_embeddings_and_output_weights=llama,
        position_embedding_type=position_embedding_type(family), rotary_percent=1.0,
        rotary_seq_len_interpolation_factor=None, transformer_impl="local", num_experts=None,
        virtual_pipeline_model_parallel_size=None, retro_add_retriever=False,
        init_method_std=config.init_method_std, hidden_dropout=0.0, attention_dropout=0.0,
        params_dtype=torch.float32, bf16=False, fp16=False, tokenizer_type="GPT2BPETokenizer",
        vocab_file="/data/gpt2-vocab.json", merge_file="/data/gpt2-merges.txt",
        tokenizer_model=None, exit_layer_nums=list(layers),
        exit_layer_weight=[exits[n].loss_weight for n in layers],
        exit_layer_weight_init=[exits[n].loss_weight_init for n in layers],
        exit_layer_temperature=[exits[n].temperature for n in layers],
        exit_layer_weight_warmup_iters=100, exit_layer_weight_warmup_style="cosine",
        use_dynamic_exit_layer_weight=False, untie_exit_output_weights=llama,
        use_exit_norm=False, use_exit_mlp=False, use_exit_block=False, pre_exit=False,
        consumed_train_samples=12345,
    )  # fmt: skip
    for name, value in flags.items():
        setattr(args, name, value)
    return args


def _rows(t, tp):
    return t.chunk(TP, dim=0)[tp].clone()


def _cols(t, tp):
    return t.chunk(TP, dim=1)[tp].clone()


def _fc1(t, tp, swiglu):
    if not swiglu:
        return _rows(t, tp)
    gate, up = t.chunk(2, dim=0)
    return torch.cat([_rows(gate, tp), _rows(up, tp)], dim=0)


def _legacy_layer(sd, ours, tp, swiglu, old_names, mlp_paths) -> dict:
    """One legacy ParallelTransformerLayer's flat keys from our layer at ``ours``; ``mlp_paths``
    are ``(legacy MLP path, (our prefix, our MLP path))`` pairs."""
    norm_in, norm_post = (
        ("input_layernorm", "post_attention_layernorm") if old_names
        else ("input_norm", "post_attention_norm")
    )  # fmt: skip
    out = {}

    def put(legacy, our_name, fn):
        if ours + our_name in sd:
            out[legacy] = fn(sd[ours + our_name])

    for suffix in ("weight", "bias"):
        put(f"{norm_in}.{suffix}", f"input_layernorm.{suffix}", torch.clone)
        put(f"{norm_post}.{suffix}", f"pre_mlp_layernorm.{suffix}", torch.clone)
        put(f"self_attention.query_key_value.{suffix}", f"self_attention.linear_qkv.{suffix}",
            lambda t: _rows(t, tp))  # fmt: skip
        put(f"self_attention.dense.{suffix}", f"self_attention.linear_proj.{suffix}",
            (lambda t: _cols(t, tp)) if suffix == "weight" else torch.clone)  # fmt: skip
    for legacy_mlp, (src, our_mlp) in mlp_paths:
        for suffix in ("weight", "bias"):
            key = f"{our_mlp}.linear_fc1.{suffix}"
            if src + key in sd:
                out[f"{legacy_mlp}.dense_h_to_4h.{suffix}"] = _fc1(sd[src + key], tp, swiglu)
            key = f"{our_mlp}.linear_fc2.{suffix}"
            if src + key in sd:
                t = sd[src + key]
                out[f"{legacy_mlp}.dense_4h_to_h.{suffix}"] = (
                    _cols(t, tp) if suffix == "weight" else t.clone()
                )
    return out


def _structure(flags: dict) -> str:
    if flags.get("use_exit_mlp"):
        return "mlp"
    if flags.get("use_exit_block"):
        return "block"
    return "norm" if flags.get("use_exit_norm") else "head"


def _legacy_encoder_layer(sd, case, args, layer_number, tp) -> dict:
    """Legacy layer ``layer_number``'s flat keys (without the ``layers.<local>.`` prefix)."""
    _, flags, layers, old_names = CASES[case]
    structure = _structure(flags)
    ours = f"decoder.layers.{layer_number - 1}."
    depth = layer_number - 1 if args.pre_exit or structure == "mlp" else layer_number
    exit_prefix = f"exit_heads.{depth}."
    mlp_paths = (("mlp", (ours, "mlp")),)
    if structure == "mlp" and layer_number in layers:
        mlp_paths = (("mlp.trunk", (ours, "mlp")),
                     ("mlp.branch", (exit_prefix + "layer.", "mlp")))  # fmt: skip
    layer = _legacy_layer(sd, ours, tp, args.swiglu, old_names, mlp_paths)
    if layer_number in layers and structure != "head":
        for suffix in ("weight", "bias"):
            if exit_prefix + "norm." + suffix in sd:
                layer[f"exit_norm.{suffix}"] = sd[exit_prefix + "norm." + suffix].clone()
    if layer_number in layers and structure == "block":
        block = _legacy_layer(sd, exit_prefix + "layer.", tp, args.swiglu, old_names,
                              (("mlp", (exit_prefix + "layer.", "mlp")),))  # fmt: skip
        layer.update({f"exit_block.{k}": v for k, v in block.items()})
    return layer


def _legacy_stage_model(sd, case, args, pp, tp) -> dict:
    """The ``model`` entry of the file of (tensor rank ``tp``, stage ``pp``)."""
    _, flags, layers, old_names = CASES[case]
    untied = args.untie_embeddings_and_output_weights
    stage_layers = range(pp * PER_STAGE + 1, (pp + 1) * PER_STAGE + 1)
    stage_exits = [n for n in layers if n in stage_layers]  # args order
    lm, encoder = {}, {}
    if pp == 0:
        lm["embedding"] = {"word_embeddings": {
            "weight": _rows(sd["embedding.word_embeddings.weight"], tp)}}  # fmt: skip
        if "embedding.position_embeddings.weight" in sd:
            lm["embedding"]["position_embeddings"] = {
                "weight": sd["embedding.position_embeddings.weight"].clone()}  # fmt: skip
    for local, layer_number in enumerate(stage_layers):
        layer = _legacy_encoder_layer(sd, case, args, layer_number, tp)
        encoder.update({f"layers.{local}.{k}": v for k, v in layer.items()})
    if pp == PP - 1:
        final_norm = "final_layernorm" if old_names else "final_norm"
        for suffix in ("weight", "bias"):
            if f"decoder.final_layernorm.{suffix}" in sd:
                encoder[f"{final_norm}.{suffix}"] = sd[f"decoder.final_layernorm.{suffix}"].clone()
        if untied:
            lm["output_layer"] = {"weight": _rows(sd["output_layer.weight"], tp)}
    lm["encoder"] = encoder
    if args.untie_exit_output_weights and stage_exits:
        shift = args.pre_exit or _structure(flags) == "mlp"
        lm["exit_output_layer"] = {
            f"{j}.weight": _rows(sd[f"exit_heads.{n - shift}.output_layer.weight"], tp)
            for j, n in enumerate(stage_exits)  # stage-local index
        }
    state_model = {"language_model": lm}
    if pp > 0 and not untied and (stage_exits or pp == PP - 1):
        state_model["word_embeddings_for_head"] = {
            "weight": _rows(sd["embedding.word_embeddings.weight"], tp)}  # fmt: skip
    return state_model


def write_legacy_checkpoint(root: Path, case: str, config, model) -> Path:
    """EE-LLM's files for ``model`` (our TP=1/PP=1 model) at TP=2, PP=2."""
    args = _legacy_args(case, config)
    sd = {k: v.detach() for k, v in model.state_dict().items() if "_extra_state" not in k}
    for pp in range(PP):
        for tp in range(TP):
            path = root / f"iter_{ITERATION:07d}" / f"mp_rank_{tp:02d}_{pp:03d}"
            path.mkdir(parents=True, exist_ok=True)
            torch.save(
                {"args": args, "checkpoint_version": 3.0, "iteration": ITERATION,
                 "model": _legacy_stage_model(sd, case, args, pp, tp),
                 "optimizer": {"state": {}},
                 "rng_state": [{"torch_rng_state": torch.get_rng_state()}]},
                path / "model_optim_rng.pt",
            )  # fmt: skip
    (root / "latest_checkpointed_iteration.txt").write_text(str(ITERATION))
    return root


# ---------------------------------------------------------------------------------------------
# The worker
# ---------------------------------------------------------------------------------------------


def _logits(model) -> dict:
    from tests.helpers import all_logits, make_batch

    return all_logits(model, make_batch(seed=4))


def _error(fn, *args, **kwargs) -> str:
    try:
        fn(*args, **kwargs)
    except ValueError as exc:
        return str(exc)
    return "<no error>"


def _case_checks(case: str, root: Path) -> dict:
    from megatron.early_exit.checkpoint.legacy import legacy_to_megatron
    from megatron.early_exit.checkpoint.loading import load_model

    config, model = _source_model(case)
    legacy = write_legacy_checkpoint(root / f"{case}_legacy", case, config, model)
    expected = _logits(model)
    torch.save(expected, root / f"{case}_expected.pt")
    legacy_to_megatron(legacy, root / f"{case}_ours", target_tensor_parallel_size=2,
                       target_pipeline_parallel_size=2)  # fmt: skip
    info, loaded_config, loaded = load_model(root / f"{case}_ours")
    got = _logits(loaded)
    source_sd, loaded_sd = model.state_dict(), loaded.state_dict()
    return {
        "heads": sorted(expected),
        "loaded_heads": sorted(got),
        "max_abs": {k: (got[k] - v).abs().max().item() for k, v in expected.items() if k in got},
        "scale": min(v.abs().max().item() for v in expected.values()),
        "tensors_unequal": [
            k
            for k, v in source_sd.items()
            if isinstance(v, torch.Tensor)
            and "_extra_state" not in k
            and not torch.equal(loaded_sd[k], v)
        ],  # fmt: skip
        "exit_heads_equal": loaded_config.exit_heads == config.exit_heads,
        "warmup": (
            loaded_config.exit_loss_weight_warmup_iters,
            loaded_config.exit_loss_weight_warmup_style,
        ),  # fmt: skip
        "untied_model": loaded_config.untie_embeddings_and_output_weights,
        "tokenizer": info.model_args["tokenizer"],
        "legacy": info.model_args["legacy_conversion"],
        "seq_length": info.model_args["seq_length"],
        "optimizer": info.optimizer,
        "iteration": info.iteration,
    }


def _rewrite(src: Path, dst: Path, edit, rank="mp_rank_00_001") -> Path:
    """A copy of the legacy checkpoint ``src`` with ``edit(state)`` applied to one file."""
    shutil.copytree(src, dst)
    path = dst / f"iter_{ITERATION:07d}" / rank / "model_optim_rng.pt"
    state = torch.load(path, weights_only=False)
    edit(state)
    torch.save(state, path)
    return dst


def _error_checks(root: Path) -> dict:
    from megatron.early_exit.checkpoint.legacy import legacy_to_model

    base = root / "tied_norm_legacy"
    out = {"missing_iteration": _error(legacy_to_model, base, iteration=5)}
    out["missing_dir"] = _error(legacy_to_model, root / "nowhere")

    def unknown(state):
        state["model"]["language_model"]["encoder"]["layers.0.self_attention.rotary.weight"] = (
            torch.zeros(3)
        )

    out["unknown_key"] = _error(legacy_to_model, _rewrite(base, root / "unknown", unknown))

    def shapes(state):
        encoder = state["model"]["language_model"]["encoder"]
        key = "layers.1.self_attention.query_key_value.weight"
        encoder[key] = encoder[key][:-8]
        state["model"]["word_embeddings_for_head"]["weight"] = torch.zeros(5, 32)

    out["wrong_shapes"] = _error(legacy_to_model, _rewrite(base, root / "shapes", shapes))

    def missing(state):
        del state["model"]["language_model"]["encoder"]["final_layernorm.bias"]

    out["missing_key"] = _error(legacy_to_model, _rewrite(base, root / "missing", missing))

    def unmappable(state):
        state["args"].use_exit_mlp = True
        state["args"].use_exit_block = True
        state["args"].transformer_impl = "transformer_engine"
        state["args"].apply_layernorm_1p = True

    out["unmappable_args"] = _error(
        legacy_to_model, _rewrite(base, root / "args", unmappable, rank="mp_rank_00_000")
    )

    def diverged(state):
        state["model"]["word_embeddings_for_head"]["weight"] += 1.0

    out["diverged_copy"] = _error(legacy_to_model, _rewrite(base, root / "copy", diverged))
    partial = root / "partial"
    shutil.copytree(base, partial)
    for tp in range(TP):
        shutil.rmtree(partial / f"iter_{ITERATION:07d}" / f"mp_rank_{tp:02d}_001")
    out["partial_stages"] = _error(legacy_to_model, partial)
    out["bad_target"] = _error(legacy_to_model, base, target_tensor_parallel_size=3)
    return out


def legacy_worker(rank: int, world_size: int, root: str) -> dict:
    from megatron.early_exit import platform

    platform.initialize(1, 1, seed=7)
    out = {case: _case_checks(case, Path(root)) for case in CASES}
    out["errors"] = _error_checks(Path(root))
    return out


RESHARD_CASES = ("tied_norm", "untied_block")


def reshard_worker(rank: int, world_size: int, root: str) -> dict:
    """The converted checkpoints loaded at TP=2 and at PP=2 (tied exits on stage 1 included)."""
    from megatron.early_exit.checkpoint.loading import Layout, load_for_inference
    from tests.distributed.test_checkpointing import _chained_logits
    from tests.helpers import make_batch, relative_error

    out = {}
    for layout in (Layout(2, 1), Layout(1, 2)):
        for case in RESHARD_CASES:
            expected = torch.load(Path(root) / f"{case}_expected.pt")
            loaded = load_for_inference(Path(root) / f"{case}_ours", layout, tokenizer=False)
            got = _chained_logits(loaded.model, make_batch(seed=4))
            name = f"{case}/tp{layout.tensor_parallel_size}pp{layout.pipeline_parallel_size}"
            out[name] = (sorted(got), max(relative_error(got[k], v) for k, v in expected.items()))
    return out


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("legacy_checkpoint")


@pytest.fixture(scope="module")
def results(workdir) -> dict:
    return run_distributed(legacy_worker, 1, str(workdir))[0]


@pytest.mark.parametrize("case", CASES)
def test_imported_checkpoint_reproduces_every_head(results, case):
    got = results[case]
    layers = CASES[case][2]
    assert len(got["heads"]) == 1 + len(layers)  # final + every exit
    assert got["loaded_heads"] == got["heads"]
    assert got["scale"] > 0.1  # not a degenerate comparison
    assert all(v < TOL for v in got["max_abs"].values()), got["max_abs"]
    assert got["tensors_unequal"] == []
    assert got["exit_heads_equal"]


@pytest.fixture(scope="module")
def resharded(results, workdir) -> dict:
    return run_distributed(reshard_worker, 2, str(workdir))[0]


@pytest.mark.parametrize("case", RESHARD_CASES)
@pytest.mark.parametrize("layout", ["tp2pp1", "tp1pp2"])
def test_imported_checkpoint_loads_at_other_layouts(resharded, results, case, layout):
    heads, error = resharded[f"{case}/{layout}"]
    assert heads == results[case]["heads"]
    assert error < TOL, error


@pytest.mark.parametrize("case", CASES)
def test_imported_checkpoint_records_its_source(results, case):
    got = results[case]
    assert got["warmup"] == (100, "cosine")
    assert got["untied_model"] == (CASES[case][0] == "llama")
    assert got["tokenizer"] == {
        "tokenizer_type": "GPT2BPETokenizer", "tokenizer_model": None,
        "vocab_file": "/data/gpt2-vocab.json", "merge_file": "/data/gpt2-merges.txt",
        "vocab_size": None,
    }  # fmt: skip
    legacy = got["legacy"]
    assert legacy["iteration"] == ITERATION and legacy["consumed_train_samples"] == 12345
    assert (legacy["tensor_parallel_size"], legacy["pipeline_parallel_size"]) == (TP, PP)
    assert legacy["target_tensor_parallel_size"] == 2
    assert got["seq_length"] == 16
    assert got["optimizer"] is None and got["iteration"] == 0


def test_refusals_name_the_problem(results):
    errors = results["errors"]
    assert "iter_0000005 does not exist" in errors["missing_iteration"]
    assert "iter_0002400" in errors["missing_iteration"]
    assert "does not exist" in errors["missing_dir"]
    unknown = errors["unknown_key"]
    assert "mp_rank_00_001/model_optim_rng.pt: unexpected key" in unknown
    assert "language_model.encoder.layers.0.self_attention.rotary.weight" in unknown
    shapes = errors["wrong_shapes"]
    assert "2 problem(s)" in shapes, shapes
    assert "layers.1.self_attention.query_key_value.weight has shape [40, 32]" in shapes
    assert "expected [48, 32]" in shapes
    assert "word_embeddings_for_head.weight has shape [5, 32], expected [32, 32]" in shapes
    assert "missing language_model.encoder.final_norm.bias" in errors["missing_key"]
    args = errors["unmappable_args"]
    assert "use_exit_mlp and args.use_exit_block" in args
    assert "transformer_impl='transformer_engine'" in args
    assert "apply_layernorm_1p=True" in args and "3 problem(s)" in args
    assert "differs from the word embedding" in errors["diverged_copy"]
    partial = errors["partial_stages"]
    assert "mp_rank_00_001, mp_rank_01_001 are missing" in partial
    assert "EE-Tuning" in partial
    assert "not divisible by the target TP size 3" in errors["bad_target"]


def test_cli_end_to_end(results, workdir):
    """The CLI is argument parsing around legacy_to_megatron; a bad directory exits with 2."""
    from megatron.early_exit.checkpoint.store import read_checkpoint_info

    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("MASTER_PORT", None)
    tool = str(REPO / "tools/checkpoint/legacy_to_megatron.py")
    out_dir = workdir / "cli_ours"
    proc = subprocess.run(
        [sys.executable, tool, "--load-dir", str(workdir / "untied_block_legacy"),
         "--save-dir", str(out_dir), "--load-iteration", str(ITERATION)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"saved {out_dir}" in proc.stdout
    info = read_checkpoint_info(out_dir)
    assert [e["structure"] for e in info.model_config["exit_heads"]] == ["block"] * 3
    bad = subprocess.run(
        [sys.executable, tool, "--load-dir", str(workdir / "nowhere"), "--save-dir",
         str(workdir / "never")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert bad.returncode == 2 and "error:" in bad.stderr and "does not exist" in bad.stderr
