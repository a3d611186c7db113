"""Train an early-exit GPT with megatron-core: ``python pretrain_early_exit_gpt.py [flags]`` or
``torchrun --nproc-per-node N pretrain_early_exit_gpt.py [flags]``. See ``--help``.

With no data flags it trains on the bundled English corpus (Brown) with its own tokenizer.
"""

from megatron.early_exit.training.run import main

if __name__ == "__main__":  # checkpoint saving spawns processes that re-import this file
    main()
