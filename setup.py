"""Installs EE-LLM as the ``megatron.early_exit`` portion of the ``megatron`` namespace package.

megatron-core owns ``megatron.core`` and ships no ``megatron/__init__.py``; neither do we, so both
install side by side as one namespace package.
"""

from setuptools import find_namespace_packages, setup

setup(
    name="ee-llm",
    version="0.1.0",
    description="Early-exit large language models on megatron-core: training, inference, serving",
    python_requires=">=3.10",
    packages=find_namespace_packages(include=["megatron.early_exit", "megatron.early_exit.*"]),
    install_requires=[
        "torch>=2.6",
        # The CPU compatibility layer and the checkpoint fixes touch private names: pin exactly.
        "megatron-core==0.16.1",
        "numpy",
        "sentencepiece",
        "tensorboard",
        "psutil",  # megatron-core's checkpoint writer processes hang without it
        "tqdm",  # megatron-core's static inference engine imports it
        "packaging",
    ],
    extras_require={
        # apex is built from NVIDIA source (see README); PyPI "apex" is an unrelated project.
        "gpu": ["transformer-engine[pytorch]", "flash-attn"],
        "server": ["fastapi", "uvicorn", "pydantic>=2", "httpx", "jinja2"],
        # Clients the server is tested with: the OpenAI client, lm-evaluation-harness.
        "eval": ["openai", "lm_eval[api]"],
        "hf": ["transformers", "safetensors", "tokenizers", "gguf", "accelerate", "protobuf"],
        "dev": ["pytest", "ruff", "matplotlib"],
        "wandb": ["wandb"],  # --wandb-project
    },
)
