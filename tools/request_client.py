"""Send prompts to an EE-LLM generation server; print the text, exit layers and latency.

    python tools/request_client.py --prompt "The capital of France is" --tokens 32
    python tools/request_client.py --prompts-file tools/prompt_example.jsonl --threshold 0.6
    python tools/request_client.py --prompt "Once upon a time" --stream --logprobs

Without ``--stream`` each prompt is one ``PUT /api`` request (the Megatron/EE-LLM contract);
with it, one ``POST /v1/completions`` request streamed as server-sent events. Early exit is on
unless ``--no-early-exit``; decoding is greedy unless ``--temperature`` is above 0. Needs only
httpx (no torch).
"""

import sys

from megatron.early_exit.server.client import main

if __name__ == "__main__":
    sys.exit(main())
