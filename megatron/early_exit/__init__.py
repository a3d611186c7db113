"""EE-LLM: early-exit LLMs on megatron-core. Importing this package has no side effects; call
:func:`megatron.early_exit.platform.initialize` to set up a process."""

__version__ = "0.1.0"
