"""Interactive client of an EE-LLM generation server: colours each token by the exit that made it.

    python tools/text_generation_cli.py                      # REPL; ":help" lists commands
    python tools/text_generation_cli.py --prompt "Hello" --threshold 0.5 --no-color

Each answer is printed token by token, coloured by the exit layer that produced the token (the
final layer in the terminal's default colour), with a legend and a per-exit token count. With
``--no-color`` early-exited tokens are marked ``token{layer}`` instead.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import TextIO

import httpx

from megatron.early_exit.server.client import (
    DEFAULT_URL,
    ClientError,
    exit_layer_summary,
    generate_body,
    put_generate,
)

RESET = "\x1b[0m"
# Shallow exits first: red through blue; the final head keeps the default colour.
_COLOURS = ("\x1b[31m", "\x1b[33m", "\x1b[32m", "\x1b[36m", "\x1b[34m", "\x1b[35m")
_HELP = """commands:
  :threshold X     set the early-exit threshold (0..1)
  :tokens N        set the number of tokens to generate
  :exits A B ...   only let these exits fire (no argument: all exits)
  :early on|off    turn early exit on or off
  :help            this text
  :quit            leave (or Ctrl-D)"""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default=DEFAULT_URL, help="server base URL")
    parser.add_argument("--prompt", help="one-shot prompt; without it, start a REPL")
    parser.add_argument("--tokens", type=int, default=50)
    parser.add_argument("--threshold", type=float, help="early-exit threshold (server default)")
    parser.add_argument("--exit-layers", type=int, nargs="+", help="exits allowed to fire")
    parser.add_argument("--no-early-exit", action="store_true")
    parser.add_argument(
        "--measure",
        choices=("max_prob", "margin", "entropy", "learned"),
        help="exit confidence measure; 'learned' asks the exits' confidence heads (cheap)",
    )
    parser.add_argument("--method", choices=("auto", "recompute", "pipelined", "speculative"))
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=0.0)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--no-color", action="store_true", help="mark exits without ANSI colour")
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args(argv)
    args.logprobs, args.stop = False, []
    return args


def exit_palette(exit_layers: Iterable[int]) -> dict[int, str]:
    """ANSI colour of each exit layer, shallowest first (colours repeat beyond six exits)."""
    return {layer: _COLOURS[i % len(_COLOURS)] for i, layer in enumerate(sorted(exit_layers))}


def render_tokens(
    segments: Sequence[str], layers: Sequence[int], palette: Mapping[int, str], color: bool
) -> str:
    """The generated text with each early-exited token coloured (or marked ``{layer}``)."""
    pieces = []
    for segment, layer in zip(segments, layers, strict=True):
        if layer not in palette:
            pieces.append(segment)
        elif color:
            pieces.append(f"{palette[layer]}{segment}{RESET}")
        else:
            pieces.append(f"{segment}{{{layer}}}")
    return "".join(pieces)


def legend(palette: Mapping[int, str], num_layers: int, color: bool) -> str:
    """One line explaining the colours (or the marks)."""
    if not color:
        return f"legend: token{{n}} = exit after layer n; unmarked = final layer {num_layers}"
    entries = [f"{code}exit@{layer}{RESET}" for layer, code in sorted(palette.items())]
    return "legend: " + " ".join(entries) + f" final@{num_layers}"


def fetch_model_info(client: httpx.Client, url: str) -> dict:
    """``GET /health``: the model's exit layers and number of layers."""
    try:
        response = client.get(f"{url.rstrip('/')}/health")
    except httpx.HTTPError as error:
        raise ClientError(f"cannot reach the server at {url}: {error}") from None
    if response.status_code != 200:
        raise ClientError(f"HTTP {response.status_code} from {url}/health")
    return response.json()


def show_answer(answer: dict, latency: float, info: dict, color: bool, out: TextIO) -> None:
    """Print one ``PUT /api`` answer: coloured text, legend, exits used, latency."""
    layers = answer["exit_layers"][0]
    segments = answer["segments"][0][-len(layers) :] if layers else []
    palette = exit_palette(info["exit_layers"])
    out.write(render_tokens(segments, layers, palette, color) + "\n")
    out.write(legend(palette, info["num_layers"], color) + "\n")
    out.write(f"exits used: {exit_layer_summary(layers)}; {latency:.3f} s\n")


def apply_command(line: str, args: argparse.Namespace) -> str | None:
    """Run a ``:command`` on the settings; returns a message, or None to quit."""
    name, *values = line[1:].split() or ["help"]
    try:
        if name in ("quit", "q", "exit"):
            return None
        if name == "threshold":
            args.threshold = float(values[0])
            return f"threshold = {args.threshold}"
        if name == "tokens":
            args.tokens = int(values[0])
            return f"tokens = {args.tokens}"
        if name == "exits":
            args.exit_layers = [int(v) for v in values] or None
            return f"exit layers = {args.exit_layers or 'all'}"
        if name == "early":
            args.no_early_exit = values[0] == "off"
            return f"early exit {'off' if args.no_early_exit else 'on'}"
    except (IndexError, ValueError):
        return f"bad arguments for :{name}; see :help"
    return _HELP


def ask(client: httpx.Client, prompt: str, args: argparse.Namespace, info: dict, out) -> None:
    answer, latency = put_generate(client, args.url, generate_body(prompt, args))
    show_answer(answer, latency, info, not args.no_color, out)


def repl(client: httpx.Client, args: argparse.Namespace, info: dict, lines, out: TextIO) -> None:
    """Read prompts (or ``:commands``) from ``lines`` until ``:quit`` or the end."""
    out.write(f"{len(info['exit_layers'])} exits at {info['exit_layers']}; :help for commands\n")
    for line in lines:
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.startswith(":"):
            message = apply_command(line, args)
            if message is None:
                return
            out.write(message + "\n")
            continue
        try:
            ask(client, line, args, info, out)
        except ClientError as error:  # keep the session going on a rejected prompt
            out.write(f"error: {error}\n")


def _input_lines():
    while True:
        try:
            yield input("prompt> ")
        except EOFError:
            return


def main(argv: Sequence[str] | None = None, lines=None, out: TextIO = sys.stdout) -> int:
    args = parse_args(argv)
    try:
        with httpx.Client(timeout=args.timeout) as client:
            info = fetch_model_info(client, args.url)
            if args.prompt is not None:
                ask(client, args.prompt, args, info, out)
            else:
                repl(client, args, info, lines if lines is not None else _input_lines(), out)
    except ClientError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0
