"""Send prompts to an EE-LLM generation server; print the text, exit layers and latency.

    python tools/request_client.py --prompt "The capital of France is" --tokens 32
    python tools/request_client.py --prompts-file tools/prompt_example.jsonl --threshold 0.6
    python tools/request_client.py --prompt "Once upon a time" --stream --logprobs

Without ``--stream`` each prompt is one ``PUT /api`` request (the Megatron/EE-LLM contract);
with it, one ``POST /v1/completions`` request streamed as server-sent events. Early exit is on
unless ``--no-early-exit``; decoding is greedy unless ``--temperature`` is above 0. Needs only
httpx (no torch).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import TextIO

import httpx

DEFAULT_URL = "http://127.0.0.1:5000"


class ClientError(Exception):
    """A request that did not produce an answer: unreachable server, or an error body."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default=DEFAULT_URL, help="server base URL")
    parser.add_argument("--prompt", action="append", default=[], help="prompt (repeatable)")
    parser.add_argument("--prompts-file", help='JSONL file, one {"text": ...} per line')
    parser.add_argument("--tokens", type=int, default=50, help="tokens to generate")
    parser.add_argument("--threshold", type=float, help="early-exit threshold (server default)")
    parser.add_argument("--exit-layers", type=int, nargs="+", help="exits allowed to fire")
    parser.add_argument("--no-early-exit", action="store_true", help="run every layer")
    parser.add_argument(
        "--measure",
        choices=("max_prob", "margin", "entropy", "learned"),
        help="exit confidence measure; 'learned' asks the exits' confidence heads (cheap)",
    )
    parser.add_argument(
        "--method", choices=("auto", "recompute", "pipelined", "speculative"), help="decoding"
    )
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0 disables (not with --stream)")
    parser.add_argument("--top-p", type=float, default=0.0, help="0 disables")
    parser.add_argument("--seed", type=int, help="random seed (server picks one otherwise)")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--stream", action="store_true", help="stream via /v1/completions")
    parser.add_argument("--logprobs", action="store_true", help="print per-token log-probs")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    args = parser.parse_args(argv)
    if not args.prompt and not args.prompts_file:
        parser.error("give --prompt TEXT or --prompts-file FILE")
    if args.stream and args.top_k:
        parser.error("--top-k is not available with --stream (/v1/completions has top_p only)")
    return args


def load_prompts(prompts: Sequence[str], prompts_file: str | None) -> list[str]:
    """The ``--prompt`` values, then the ``"text"`` of each line of ``prompts_file``."""
    loaded = list(prompts)
    if prompts_file:
        with open(prompts_file, encoding="utf-8") as file:
            for number, line in enumerate(file, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    text = record["text"]
                except (json.JSONDecodeError, KeyError, TypeError) as error:
                    raise ClientError(
                        f'{prompts_file}:{number}: expected a JSON object with "text" ({error})'
                    ) from None
                if not isinstance(text, str):
                    raise ClientError(f'{prompts_file}:{number}: "text" must be a string')
                loaded.append(text)
    return loaded


def generate_body(prompt: str, args: argparse.Namespace) -> dict:
    """``PUT /api`` body for one prompt."""
    body: dict = {
        "prompts": [prompt],
        "tokens_to_generate": args.tokens,
        "logprobs": args.logprobs,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "use_early_exit": not args.no_early_exit,
    }
    if not args.no_early_exit:
        if args.threshold is not None:
            body["early_exit_thres"] = args.threshold
        if args.exit_layers:
            body["exit_layers"] = args.exit_layers
        if args.measure:
            body["early_exit_measure"] = args.measure
        if args.method:
            body["early_exit_method"] = args.method
    if args.seed is not None:
        body["random_seed"] = args.seed
    if args.stop:
        body["stop_sequences"] = args.stop
    return body


def completion_body(prompt: str, args: argparse.Namespace, stream: bool = True) -> dict:
    """``POST /v1/completions`` body for one prompt."""
    early_exit: dict = {"enabled": not args.no_early_exit}
    if not args.no_early_exit:
        if args.threshold is not None:
            early_exit["threshold"] = args.threshold
        if args.exit_layers:
            early_exit["exit_layers"] = args.exit_layers
        if args.measure:
            early_exit["measure"] = args.measure
        if args.method:
            early_exit["method"] = args.method
    body: dict = {
        "prompt": prompt,
        "max_tokens": args.tokens,
        "temperature": args.temperature,
        "stream": stream,
        "early_exit": early_exit,
    }
    if 0 < args.top_p < 1:
        body["top_p"] = args.top_p
    if args.logprobs:
        body["logprobs"] = 0
    if args.seed is not None:
        body["seed"] = args.seed
    if args.stop:
        body["stop"] = args.stop
    return body


def describe_error_response(response: httpx.Response) -> str:
    """One line from an error response: the server's message and field, or the raw body."""
    try:
        error = response.json()["error"]
        field = f" (field: {error['field']})" if error.get("field") else ""
        detail = f"{error['message']}{field}"
    except (ValueError, KeyError, TypeError):
        detail = response.text.strip()[:500] or response.reason_phrase
    return f"HTTP {response.status_code}: {detail}"


def _connection_error(url: str, error: httpx.HTTPError) -> ClientError:
    if isinstance(error, httpx.TimeoutException):
        return ClientError(f"request to {url} timed out ({error})")
    return ClientError(f"cannot reach the server at {url}: {error}")


def put_generate(client: httpx.Client, url: str, body: dict) -> tuple[dict, float]:
    """Send one ``PUT /api`` request; returns the JSON answer and the wall time in seconds."""
    start = time.perf_counter()
    try:
        response = client.put(f"{url.rstrip('/')}/api", json=body)
    except httpx.HTTPError as error:
        raise _connection_error(url, error) from None
    if response.status_code >= 400:
        raise ClientError(describe_error_response(response))
    return response.json(), time.perf_counter() - start


def parse_sse_lines(lines: Iterator[str]) -> Iterator[dict]:
    """Decode ``data:`` events until ``[DONE]``; an ``error`` event raises ``ClientError``."""
    for line in lines:
        if not line.startswith("data:"):
            continue
        payload = line[len("data:") :].strip()
        if payload == "[DONE]":
            return
        event = json.loads(payload)
        if "error" in event:
            raise ClientError(f"server error during streaming: {event['error'].get('message')}")
        yield event
    raise ClientError("stream ended without [DONE]")


def stream_completion(client: httpx.Client, url: str, body: dict) -> Iterator[dict]:
    """Stream one ``POST /v1/completions`` request; yields each chunk."""
    try:
        with client.stream("POST", f"{url.rstrip('/')}/v1/completions", json=body) as response:
            if response.status_code >= 400:
                response.read()
                raise ClientError(describe_error_response(response))
            yield from parse_sse_lines(response.iter_lines())
    except httpx.HTTPError as error:
        raise _connection_error(url, error) from None


def exit_layer_summary(exit_layers: Sequence[int]) -> str:
    """``"layer 2: 3 (30%), layer 8: 7 (70%)"``: how many tokens each exit produced."""
    if not exit_layers:
        return "no tokens"
    counts = Counter(exit_layers)
    return ", ".join(
        f"layer {layer}: {count} ({100 * count / len(exit_layers):.0f}%)"
        for layer, count in sorted(counts.items())
    )


def format_generate(prompt: str, answer: dict, latency: float, show_logprobs: bool) -> str:
    """Human-readable report of one ``PUT /api`` answer."""
    layers = answer["exit_layers"][0]
    lines = [
        f"prompt: {prompt!r}",
        f"text: {answer['text'][0]!r}",
        f"exit layers: {' '.join(map(str, layers))}",
        f"exits used: {exit_layer_summary(layers)}",
    ]
    if show_logprobs and answer.get("logprobs"):
        tokens = answer["segments"][0][-len(layers) :] if layers else []
        pairs = zip(tokens, answer["logprobs"][0], strict=False)
        lines.append("logprobs: " + " ".join(f"{tok!r}:{lp:.3f}" for tok, lp in pairs))
    lines.append(f"latency: {latency:.3f} s (server {answer['request_time']:.3f} s)")
    return "\n".join(lines)


def run_stream(
    client: httpx.Client, url: str, body: dict, out: TextIO, show_logprobs: bool = False
) -> dict:
    """Print a streamed completion as it arrives; returns text, exit layers and timings."""
    start = time.perf_counter()
    first_token_s = None
    text, exit_layers, logprobs = [], [], []
    for chunk in stream_completion(client, url, body):
        for choice in chunk.get("choices", []):
            if first_token_s is None and choice.get("exit_layers"):
                first_token_s = time.perf_counter() - start
            text.append(choice.get("text", ""))
            exit_layers.extend(choice.get("exit_layers") or [])
            logprobs.extend((choice.get("logprobs") or {}).get("token_logprobs") or [])
            out.write(choice.get("text", ""))
            out.flush()
    latency = time.perf_counter() - start
    out.write("\n")
    out.write(f"exit layers: {' '.join(map(str, exit_layers))}\n")
    out.write(f"exits used: {exit_layer_summary(exit_layers)}\n")
    if show_logprobs:
        out.write("logprobs: " + " ".join(f"{lp:.3f}" for lp in logprobs) + "\n")
    ttft = f", first token {first_token_s:.3f} s" if first_token_s is not None else ""
    out.write(f"latency: {latency:.3f} s{ttft}\n")
    return {"text": "".join(text), "exit_layers": exit_layers, "latency": latency}


def main(argv: Sequence[str] | None = None, out: TextIO = sys.stdout) -> int:
    args = parse_args(argv)
    try:
        prompts = load_prompts(args.prompt, args.prompts_file)
        with httpx.Client(timeout=args.timeout) as client:
            for prompt in prompts:
                if args.stream:
                    out.write(f"prompt: {prompt!r}\n")
                    run_stream(client, args.url, completion_body(prompt, args), out, args.logprobs)
                else:
                    answer, latency = put_generate(client, args.url, generate_body(prompt, args))
                    out.write(format_generate(prompt, answer, latency, args.logprobs) + "\n")
                out.write("\n")
    except (ClientError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0
