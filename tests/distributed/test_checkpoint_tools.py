"""Checkpoint tools: HF directory -> EE-LLM checkpoint -> HF directory, adding exits, errors.

One spawned rank runs every conversion through the library functions the CLIs call
(:mod:`megatron.early_exit.checkpoint.convert` / ``add_exits``) on random tiny HF models saved to
a temporary directory (Llama with GQA and untied embeddings plus a tokenizer; GPT-2 tied, with
biases and learned positions) and returns the checks; the pytest tests assert them. Oracles:
HF's own logits (fp32, 1e-4 absolute), bit-identical HF tensors after HF -> ours (saved
checkpoint) -> HF, exits restored bit-identically from ``early_exits.json``, and an exit that
copies the final norm and head after the last layer reproducing the final logits exactly. One
subprocess runs ``tools/checkpoint/megatron_to_hf.py`` end to end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed.harness import run_distributed
from tests.helpers import tiny_hf_model

LOGIT_TOL = 1e-4
FAMILIES = ("llama", "gpt2")
NUM_LAYERS = 3
BATCH, SEQ = 2, 12
REPO = Path(__file__).resolve().parents[2]


def _save_tokenizer(directory: Path) -> None:
    """A tiny word-level tokenizer (no hub access) saved the way HF saves one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 128)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.save_pretrained(str(directory))


def _inputs():
    generator = torch.Generator().manual_seed(5)
    input_ids = torch.randint(0, 128, (BATCH, SEQ), generator=generator)
    position_ids = torch.arange(SEQ).unsqueeze(0).expand(BATCH, -1).contiguous()
    mask = torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool).triu(1)
    return input_ids, position_ids, mask


def _ours(model):
    input_ids, position_ids, mask = _inputs()
    with torch.no_grad():
        return model(input_ids, position_ids, mask, runtime_gather_output=True)


def _error(fn, *args, **kwargs) -> str:
    try:
        fn(*args, **kwargs)
    except ValueError as exc:
        return str(exc)
    return "<no error>"


def _family_checks(family: str, root: Path) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    from megatron.early_exit.checkpoint.add_exits import add_exits_to_checkpoint
    from megatron.early_exit.checkpoint.convert import (
        EXITS_JSON,
        NewExits,
        hf_to_megatron,
        hf_to_model,
        megatron_to_hf,
        read_hf_state_dict,
    )
    from megatron.early_exit.checkpoint.loading import load_model
    from megatron.early_exit.checkpoint.store import read_checkpoint_info

    out: dict = {}
    hf = tiny_hf_model(family, NUM_LAYERS)
    hf_sd = {k: v.clone() for k, v in hf.state_dict().items()}
    hf_dir, ckpt, back_dir = root / f"{family}_hf", root / f"{family}_ckpt", root / f"{family}_hf2"
    hf.save_pretrained(str(hf_dir))
    if family == "llama":
        _save_tokenizer(hf_dir)
    with torch.no_grad():
        expected = hf(input_ids=_inputs()[0]).logits

    # HF -> checkpoint with a norm exit after the last layer copied from the final norm/head.
    hf_to_megatron(
        hf_dir, ckpt, target_tensor_parallel_size=2, target_pipeline_parallel_size=1,
        new_exits=NewExits((NUM_LAYERS,), structure="norm"),
    )  # fmt: skip
    info, config, model = load_model(ckpt)
    logits, exits = _ours(model)
    out["logits_max_abs"] = (logits - expected).abs().max().item()
    out["logits_scale"] = expected.abs().max().item()
    out["exit_depths"] = sorted(exits)
    out["exit_equals_final"] = torch.equal(exits[NUM_LAYERS], logits)
    out["optimizer"] = info.optimizer
    out["iteration"] = info.iteration
    tokenizer = info.model_args["tokenizer"]
    out["tokenizer"] = tokenizer and {
        "type": tokenizer["tokenizer_type"],
        "in_save_dir": Path(tokenizer["tokenizer_model"]) == (ckpt / "tokenizer").resolve(),
        "files": sorted(os.listdir(tokenizer["tokenizer_model"])),
    }
    out["seq_length"] = info.model_args["seq_length"]
    out["target_tp"] = info.model_args["hf_conversion"]["target_tensor_parallel_size"]

    # Checkpoint -> HF: identical tensors, exits beside the model, HF loads it.
    megatron_to_hf(ckpt, back_dir)
    saved = read_hf_state_dict(back_dir)
    out["saved_keys"] = sorted(saved) == sorted(k for k in hf_sd if k in saved)
    out["saved_drops_tied_copy"] = ("lm_head.weight" in saved) == (family == "llama")
    # Built from the saved config and loaded with the saved tensors rather than through
    # from_pretrained, which in a process with the platform's CPU compatibility installed leaves
    # Llama's rotary inv_freq buffer uninitialised (an interaction outside the converter).
    reloaded = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(back_dir)))
    result = reloaded.load_state_dict(saved, strict=False)
    out["roundtrip/missing"] = sorted(result.missing_keys)
    reloaded = reloaded.float().eval()
    got = reloaded.state_dict()
    out["roundtrip/keys"] = sorted(got) == sorted(hf_sd)
    out["roundtrip/unequal"] = [k for k in hf_sd if not torch.equal(got[k], hf_sd[k])]
    with torch.no_grad():
        out["roundtrip/logits_equal"] = torch.equal(
            reloaded(input_ids=_inputs()[0]).logits, expected
        )
    out["roundtrip/config_equal"] = json.loads((hf_dir / "config.json").read_text()) == (
        json.loads((back_dir / "config.json").read_text())
    )
    record = json.loads((back_dir / EXITS_JSON).read_text())
    out["exits_json"] = [
        {k: e[k] for k in ("depth", "layer_number", "pre_exit", "structure", "untied", "tensors")}
        for e in record["exits"]
    ]
    out["tokenizer_back"] = (back_dir / "tokenizer.json").is_file()

    # HF (with early_exits.json) -> ours again: the same model, exits included.
    _, config2, model2, _ = hf_to_model(back_dir)
    own, again = model.state_dict(), model2.state_dict()
    out["exits_restored"] = config2.exit_heads == config.exit_heads
    out["restored_unequal"] = [
        k for k, v in own.items() if isinstance(v, torch.Tensor) and not torch.equal(again[k], v)
    ]

    # Adding exits to the checkpoint.
    added = root / f"{family}_added"
    out["add/exists"] = _error(
        add_exits_to_checkpoint, ckpt, added, layer_numbers=[NUM_LAYERS], structure="norm"
    )
    structure = "mlp" if family == "llama" else "block"
    add_exits_to_checkpoint(
        ckpt, added, layer_numbers=[1, NUM_LAYERS], structure=structure, overwrite=True
    )
    info3, config3, model3 = load_model(added)
    sd3 = model3.state_dict()
    out["add/model_args_kept"] = info3.model_args == info.model_args
    out["add/structures"] = [(e.depth, e.structure, e.untied) for e in config3.exit_heads]
    last = f"decoder.layers.{NUM_LAYERS - 1}."
    if structure == "mlp":
        pairs = [("exit_heads.1.mlp.linear_fc1.weight", "decoder.layers.0.mlp.linear_fc1.weight"),
                 ("exit_heads.1.mlp_norm.weight", "decoder.layers.0.pre_mlp_layernorm.weight"),
                 ("exit_heads.1.output_layer.weight", "output_layer.weight")]  # fmt: skip
    else:
        pairs = [("exit_heads.1.layer.self_attention.linear_qkv.weight",
                  last + "self_attention.linear_qkv.weight"),
                 ("exit_heads.1.layer.mlp.linear_fc2.bias",
                  last + "mlp.linear_fc2.bias")]  # fmt: skip
    pairs.append((f"exit_heads.{NUM_LAYERS}.norm.weight", "decoder.final_layernorm.weight"))
    out["add/copied"] = all(torch.equal(sd3[a], sd3[b]) for a, b in pairs)
    out["add/backbone_kept"] = all(
        torch.equal(sd3[k], v)
        for k, v in own.items()
        if isinstance(v, torch.Tensor) and not k.startswith("exit_heads.")
    )
    logits3, exits3 = _ours(model3)
    out["add/final_unchanged"] = torch.equal(logits3, logits)
    out["add/last_exit_equals_final"] = torch.equal(exits3[NUM_LAYERS], logits3)
    random_dir = root / f"{family}_random"
    add_exits_to_checkpoint(ckpt, random_dir, layer_numbers=[2], structure="norm",
                            random_init=True, init_method_std=0.05)  # fmt: skip
    info4 = read_checkpoint_info(random_dir)
    out["add/random_std"] = info4.model_config["init_method_std"]
    return out


def _bad_input_checks(root: Path) -> dict:
    from megatron.early_exit.checkpoint.convert import hf_to_model, target_layout_problems

    mistral = root / "mistral"
    mistral.mkdir()
    (mistral / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    llama = root / "llama_hf"
    return {
        "unknown_architecture": _error(hf_to_model, mistral),
        "target_tp3": _error(hf_to_model, llama, target_tensor_parallel_size=3),
        "target_pp2": _error(hf_to_model, llama, target_pipeline_parallel_size=2),
        "layout_ok": target_layout_problems(
            {
                "num_attention_heads": 4,
                "num_query_groups": 2,
                "ffn_hidden_size": 96,
                "num_layers": 4,
            },
            {"vocab_size": 128},
            2,
            2,
        ),  # fmt: skip
        "missing_dir": _error(hf_to_model, root / "nowhere"),
    }


def tools_worker(rank: int, world_size: int, root: str) -> dict:
    from megatron.early_exit import platform

    platform.initialize(1, 1, seed=7)
    out = {family: _family_checks(family, Path(root)) for family in FAMILIES}
    out["bad"] = _bad_input_checks(Path(root))
    out["te_host"] = _te_host_checks(Path(root))
    return out


def _te_host_checks(root: Path) -> dict:
    """The tools on a host where Transformer Engine is present (issue 15, defect 6): they must
    build with the local layer spec, whose names their state dicts use. Simulated: TE cannot
    run here, so a tool that picked TE's spec fails to build at all."""
    from megatron.early_exit import platform
    from megatron.early_exit.checkpoint.add_exits import add_exits_to_checkpoint
    from megatron.early_exit.checkpoint.convert import hf_to_megatron, megatron_to_hf
    from megatron.early_exit.model.layer_specs import uses_transformer_engine

    hf = tiny_hf_model("llama", NUM_LAYERS)
    with torch.no_grad():
        expected = hf(input_ids=_inputs()[0]).logits
    hf.save_pretrained(str(root / "te_hf"))
    real = platform.has_transformer_engine
    platform.has_transformer_engine = lambda: True
    out = {}
    try:
        hf_to_megatron(root / "te_hf", root / "te_ckpt")
        add_exits_to_checkpoint(root / "te_ckpt", root / "te_exits", layer_numbers=(1,),
                                structure="block", untied=True)  # fmt: skip
        megatron_to_hf(root / "te_exits", root / "te_back")
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        platform.has_transformer_engine = real
    if "error" not in out:
        from megatron.early_exit.checkpoint.loading import load_model

        _, config, model = load_model(root / "te_exits")
        logits, exits = _ours(model)
        out["logits_max_abs"] = (logits - expected).abs().max().item()
        out["exit_depths"] = sorted(exits)
        out["tools_local"] = not uses_transformer_engine(config)
    return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("checkpoint_tools")


@pytest.fixture(scope="module")
def results(workdir) -> dict:
    pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    return run_distributed(tools_worker, 1, str(workdir))[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_converted_checkpoint_matches_hugging_face_logits(results, family):
    got = results[family]
    assert got["logits_scale"] > 0.1  # not a degenerate comparison
    assert got["logits_max_abs"] < LOGIT_TOL, got["logits_max_abs"]
    assert got["optimizer"] is None and got["iteration"] == 0
    assert got["target_tp"] == 2


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_through_checkpoint_is_bit_identical(results, family):
    got = results[family]
    assert got["saved_keys"] and got["saved_drops_tied_copy"]
    assert got["roundtrip/keys"]
    assert got["roundtrip/unequal"] == []
    assert got["roundtrip/missing"] == ([] if family == "llama" else ["lm_head.weight"])
    assert got["roundtrip/logits_equal"]
    assert got["roundtrip/config_equal"]


@pytest.mark.parametrize("family", FAMILIES)
def test_exits_are_saved_beside_hf_model_and_restored(results, family):
    got = results[family]
    untied = family == "llama"
    tensors = ["norm.weight"] + (["output_layer.weight"] if untied else [])
    if family == "gpt2":
        tensors = ["norm.bias", "norm.weight"]
    assert got["exits_json"] == [
        dict(depth=3, layer_number=3, pre_exit=False, structure="norm", untied=untied,
             tensors=tensors)
    ]  # fmt: skip
    assert got["exits_restored"]
    assert got["restored_unequal"] == []


@pytest.mark.parametrize("family", FAMILIES)
def test_copied_norm_exit_after_last_layer_reproduces_final_logits(results, family):
    assert results[family]["exit_depths"] == [NUM_LAYERS]
    assert results[family]["exit_equals_final"]


def test_tokenizer_files_come_along(results):
    tokenizer = results["llama"]["tokenizer"]
    assert tokenizer["type"] == "HuggingFaceTokenizer" and tokenizer["in_save_dir"]
    assert "tokenizer.json" in tokenizer["files"]
    assert results["llama"]["tokenizer_back"]
    assert results["gpt2"]["tokenizer"] is None  # none in the HF directory
    assert results["llama"]["seq_length"] == 64 and results["gpt2"]["seq_length"] == 32


@pytest.mark.parametrize("family", FAMILIES)
def test_add_exits(results, family):
    got = results[family]
    assert "already exists" in got["add/exists"] and "--overwrite-exits" in got["add/exists"]
    untied = family == "llama"
    structure = "mlp" if family == "llama" else "block"
    assert got["add/structures"] == [(1, structure, untied), (NUM_LAYERS, structure, untied)]
    assert got["add/copied"]
    assert got["add/backbone_kept"] and got["add/final_unchanged"]
    assert got["add/model_args_kept"]
    assert got["add/random_std"] == 0.05


def test_tools_use_the_local_spec_on_a_transformer_engine_host(results):
    got = results["te_host"]
    assert "error" not in got, got.get("error")
    assert got["logits_max_abs"] < LOGIT_TOL and got["exit_depths"] == [1]
    assert got["tools_local"]


def test_bad_inputs_list_every_problem(results):
    bad = results["bad"]
    assert "model_type='mistral'" in bad["unknown_architecture"]
    assert "supported: llama, gpt2" in bad["unknown_architecture"]
    tp3 = bad["target_tp3"]
    assert "3 problem(s)" in tp3, tp3
    for needle in ("num_attention_heads=4", "num_query_groups (key/value heads)=2",
                   "vocab_size=128 is not divisible by the target TP size 3"):  # fmt: skip
        assert needle in tp3
    assert "num_layers=3 is not divisible by the target PP size 2" in bad["target_pp2"]
    assert bad["layout_ok"] == []
    assert "no config.json" in bad["missing_dir"]


def test_megatron_to_hf_cli_end_to_end(results, workdir):
    """The CLI is argument parsing around megatron_to_hf: its output equals the library's."""
    from safetensors.torch import load_file

    out_dir = workdir / "cli_hf"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("MASTER_PORT", None)
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools/checkpoint/megatron_to_hf.py"),
         "--load-dir", str(workdir / "gpt2_ckpt"), "--save-dir", str(out_dir)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    cli = load_file(str(out_dir / "model.safetensors"))
    lib = load_file(str(workdir / "gpt2_hf2" / "model.safetensors"))
    assert sorted(cli) == sorted(lib)
    assert all(torch.equal(cli[k], lib[k]) for k in lib)
    assert (out_dir / "early_exits.json").read_text() == (
        workdir / "gpt2_hf2" / "early_exits.json"
    ).read_text()
