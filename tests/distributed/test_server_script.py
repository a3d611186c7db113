"""``tools/run_text_generation_server.py`` end to end: a checkpoint trained by the entry point,
served by one process (PP=1, KV recomputation) and by ``torchrun`` over two pipeline stages
(pipelined decoding); both answer the same requests with the same tokens and exit layers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from megatron.early_exit.launch import free_port
from tests.distributed.harness import torchrun_command

ROOT = Path(__file__).resolve().parents[2]
TRAIN = (
    "--num-layers 4 --hidden-size 64 --num-attention-heads 4 --seq-length 64 "
    "--max-position-embeddings 64 --normalization RMSNorm --swiglu --position-embedding-type rope "
    "--exit-layer-nums 1 3 --use-exit-norm --init-method-std 0.2 "
    "--micro-batch-size 2 --global-batch-size 2 --lr 1e-3 --train-iters 2 --log-interval 1 "
    "--mock-data --tokenizer-type ByteLevelTokenizer --seed 3"
)
PROMPTS = ["The county jury said", "It was"]


def _request(url: str, payload: dict, method: str = "PUT") -> tuple[int, dict]:
    data = json.dumps(payload).encode()
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _serve(load: Path, *launcher_and_flags: str):
    """Start the server, wait for ``/health``; returns ``(process, base url)``."""
    port = free_port()
    command = [
        *launcher_and_flags[:-1],
        str(ROOT / "tools" / "run_text_generation_server.py"),
        "--load", str(load), "--port", str(port), *launcher_and_flags[-1].split(),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {process.stdout.read().decode()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return process, url
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError("server did not come up in 120 s")


def _answers(url: str) -> dict:
    base = {"prompts": PROMPTS, "tokens_to_generate": 10, "use_early_exit": True}
    return {
        "never": _request(f"{url}/api", {**base, "early_exit_thres": 1.0}),
        "zero": _request(f"{url}/api", {**base, "early_exit_thres": 0}),
        "mid": _request(f"{url}/api", {**base, "early_exit_thres": 0.05}),
        "full": _request(f"{url}/api", {"prompts": PROMPTS, "tokens_to_generate": 10}),
        "speculative": _request(f"{url}/api", {**base, "early_exit_method": "speculative"}),
        "pipelined": _request(f"{url}/api", {**base, "early_exit_method": "pipelined"}),
    }


def _train(save_dir) -> None:
    """Train the tiny served checkpoint (``TRAIN``) into ``save_dir``."""
    trained = subprocess.run(
        [sys.executable, str(ROOT / "pretrain_early_exit_gpt.py"), *TRAIN.split(),
         "--save", str(save_dir)],
        cwd=save_dir.parent, capture_output=True, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:]


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("server_script")
    _train(work / "ckpt")
    out = {}
    for name, launcher in {
        "pp1": (sys.executable, ""),
        "pp2": (*torchrun_command(2), "--pipeline-model-parallel-size 2"),
    }.items():
        process, url = _serve(work / "ckpt", *launcher)
        try:
            out[name] = _answers(url)
        finally:
            process.terminate()
            process.wait(timeout=30)
    return out


@pytest.mark.parametrize("name", ["never", "zero", "mid", "full"])
def test_pipeline_server_answers_like_the_single_process_server(served, name):
    status_pp1, body_pp1 = served["pp1"][name]
    status_pp2, body_pp2 = served["pp2"][name]
    assert status_pp1 == status_pp2 == 200
    assert body_pp2["text"] == body_pp1["text"]
    assert body_pp2["exit_layers"] == body_pp1["exit_layers"]


def test_exit_layers_by_threshold(served):
    body = served["pp2"]["zero"][1]
    assert {d for row in body["exit_layers"] for d in row} == {1}
    assert {d for row in served["pp2"]["never"][1]["exit_layers"] for d in row} == {4}


def test_methods_each_layout_offers(served):
    assert served["pp1"]["speculative"][0] == 200
    assert served["pp1"]["pipelined"][0] == 422 or served["pp1"]["pipelined"][0] == 400
    assert "pipelined" in served["pp1"]["pipelined"][1]["error"]["message"]
    assert served["pp2"]["speculative"][0] in (400, 422)
    assert served["pp2"]["pipelined"][0] == 200
