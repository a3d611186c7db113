"""The OpenAI surface of ``tools/run_text_generation_server.py`` on a trained checkpoint.

One checkpoint (trained by the entry point, byte-level tokenizer, exits after layers 1 and 3, no
confidence heads) is served by one process and by ``torchrun`` over two tensor-parallel ranks
(the broadcasting server). Checked against the model's own no-cache forward, computed in a
spawned process from the same checkpoint:

* the official ``openai`` client drives chat and completions, streaming included;
* prompt scoring (``echo`` + ``logprobs``, exactly the request lm-evaluation-harness'
  ``local-completions`` sends) gives the forward's log-probs within 1e-4, through the final head
  and through an exit (``score_exit_layer`` and the ``<model>@exit<K>`` alias), on both layouts;
* lm-evaluation-harness itself scores a small local multiple-choice task through the server,
  and its log-likelihoods equal the forward's, final head and exit;
* on the broadcasting server, ``measure: "learned"`` answers 400 (not 500) and echoed non-ASCII
  prompts come back whole, and ``PUT /api`` with ``tokens_to_generate: 0`` scores in Megatron's
  format.

``openai`` and ``lm_eval`` are optional extras (``pip install 'ee-llm[eval]'``): the tests that
need them skip without them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.distributed.harness import run_distributed, torchrun_command
from tests.distributed.test_server_script import ROOT, _request, _serve, _train

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
EXIT = 3  # the exit scored and aliased (exits follow layers 1 and 3 of 4)
QUESTIONS = [
    {"question": "The sky is", "choices": ["blue", "green", "loud"], "answer": 0},
    {"question": "Naïve café: two plus two is", "choices": ["four", "five"], "answer": 0},
]
TEXTS = ["The county jury said it was", "Naïve café — 日本語 ok"]


def reference_worker(rank: int, world_size: int, load: str, texts: list[str]) -> dict:
    """Per-token log-probs of ``texts`` by the model's own no-cache forward, final and exit."""
    import torch

    from megatron.early_exit.checkpoint.loading import load_for_inference

    loaded = load_for_inference(load)
    model, tokenizer = loaded.model, loaded.tokenizer
    out = {}
    for text in texts:
        ids = tokenizer.tokenize(text)
        tokens = torch.tensor([ids])
        s = tokens.shape[1]
        mask = torch.ones(1, 1, s, s, dtype=torch.bool).triu(1)
        with torch.no_grad():
            final, exits = model(tokens, torch.arange(s)[None], mask, runtime_gather_output=True)
        heads = {"final": final, "exit": exits[EXIT]}
        out[text] = {"ids": ids}
        for name, logits in heads.items():
            logprobs = torch.log_softmax(logits[0].float(), -1)
            out[text][name] = [None] + logprobs[:-1].gather(
                1, torch.tensor(ids[1:])[:, None]
            ).squeeze(1).tolist()
    return out


def _lm_eval_texts() -> list[str]:
    """The token sequences lm-evaluation-harness scores: context + " " + choice (byte level)."""
    return [f"{q['question']} {choice}" for q in QUESTIONS for choice in q["choices"]]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    work = tmp_path_factory.mktemp("openai_server")
    _train(work / "ckpt")
    (work / "chat.jinja").write_text(TEMPLATE)
    flags = f"--chat-template {work / 'chat.jinja'} --model-name tiny"
    reference = run_distributed(
        reference_worker, 1, str(work / "ckpt"), TEXTS + _lm_eval_texts()
    )[0]
    processes = {}
    try:
        processes["tp1"] = _serve(work / "ckpt", sys.executable, flags)
        processes["tp2"] = _serve(work / "ckpt", *torchrun_command(2), flags)
        yield {
            "work": work,
            "reference": reference,
            "urls": {name: url for name, (_, url) in processes.items()},
        }
    finally:
        for process, _ in processes.values():
            process.terminate()
            process.wait(timeout=30)


def _post(url: str, payload: dict) -> tuple[int, dict]:
    return _request(url, payload, method="POST")


def _close(actual, expected) -> None:
    assert len(actual) == len(expected)
    assert actual[0] is None and expected[0] is None
    assert max(abs(a - e) for a, e in zip(actual[1:], expected[1:])) < 1e-4, (actual, expected)


# ------------------------------------------------------------------------------ scoring


@pytest.mark.parametrize("layout", ["tp1", "tp2"])
@pytest.mark.parametrize("text", TEXTS)
def test_echo_logprobs_equal_the_forward(served, layout, text):
    url = served["urls"][layout]
    reference = served["reference"][text]
    body = {"model": "tiny", "prompt": [reference["ids"]], "temperature": 0, "max_tokens": 1,
            "logprobs": 1, "seed": 1234, "echo": True}  # fmt: skip
    status, answer = _post(f"{url}/v1/completions", body)
    assert status == 200, answer
    logprobs = answer["choices"][0]["logprobs"]
    n = len(reference["ids"])
    _close(logprobs["token_logprobs"][:n], reference["final"])
    assert "".join(logprobs["tokens"][:n]) == text  # echoed whole, non-ASCII included
    for top, chosen in zip(logprobs["top_logprobs"][1:n], logprobs["token_logprobs"][1:n]):
        assert max(top.values()) >= chosen - 1e-6
    for exit_body in ({**body, "score_exit_layer": EXIT}, {**body, "model": f"tiny@exit{EXIT}"}):
        status, answer = _post(f"{url}/v1/completions", {**exit_body, "max_tokens": 0})
        assert status == 200, answer
        _close(answer["choices"][0]["logprobs"]["token_logprobs"], reference["exit"])


def test_put_api_scores_in_megatrons_format(served):
    text = TEXTS[1]
    reference = served["reference"][text]
    status, answer = _request(
        f"{served['urls']['tp2']}/api",
        {"prompts": [text], "tokens_to_generate": 0, "logprobs": True},
    )
    assert status == 200, answer
    assert answer["text"] == [text] and "".join(answer["segments"][0]) == text
    _close([None, *answer["logprobs"][0]], reference["final"])


# --------------------------------------------------------------- broadcasting server fixes


def test_learned_measure_is_a_400_on_the_broadcasting_server(served):
    status, answer = _request(
        f"{served['urls']['tp2']}/api",
        {"prompts": ["hi"], "tokens_to_generate": 4, "use_early_exit": True,
         "early_exit_measure": "learned"},  # fmt: skip
    )
    assert status == 400, answer
    assert answer["error"]["field"] == "early_exit_measure"
    status, answer = _request(
        f"{served['urls']['tp2']}/api", {"prompts": ["hi"], "tokens_to_generate": 4}
    )
    assert status == 200, answer  # and the ranks are still in step


def test_echoed_non_ascii_segments_on_the_broadcasting_server(served):
    prompt = TEXTS[1]
    status, answer = _request(
        f"{served['urls']['tp2']}/api",
        {"prompts": [prompt], "tokens_to_generate": 2, "echo_prompts": True},
    )
    assert status == 200, answer
    segments = answer["segments"][0]
    assert "".join(segments).startswith(prompt) and "\ufffd" not in "".join(segments[:-2])


# ------------------------------------------------------------------------- openai client


@pytest.fixture(scope="module")
def openai_client(served):
    openai = pytest.importorskip("openai", reason="the openai client is an optional extra")
    return openai.OpenAI(base_url=f"{served['urls']['tp1']}/v1", api_key="unused", timeout=60)


def test_openai_client_lists_models(openai_client):
    assert [m.id for m in openai_client.models.list()] == ["tiny", "tiny@exit1", "tiny@exit3"]


def test_openai_client_chat(openai_client):
    messages = [{"role": "user", "content": "Say something"}]
    answer = openai_client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=6, temperature=0, seed=1,
        extra_body={"early_exit": {"threshold": 0.0, "exit_layers": [1]}},
    )  # fmt: skip
    assert answer.choices[0].message.role == "assistant"
    assert answer.usage.completion_tokens == len(answer.choices[0].model_extra["exit_layers"])
    assert set(answer.choices[0].model_extra["exit_layers"]) <= {1}
    stream = openai_client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=6, temperature=0, seed=1, stream=True,
        extra_body={"early_exit": {"threshold": 0.0, "exit_layers": [1]}},
    )  # fmt: skip
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == answer.choices[0].message.content


def test_openai_client_completions(openai_client):
    answer = openai_client.completions.create(
        model="tiny", prompt="The county", max_tokens=8, temperature=0, logprobs=2,
        presence_penalty=0, frequency_penalty=0, user="tester",
    )  # fmt: skip
    choice = answer.choices[0]
    assert len(choice.logprobs.tokens) == answer.usage.completion_tokens
    stream = openai_client.completions.create(
        model="tiny", prompt="The county", max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    text = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
    assert text == choice.text


# ------------------------------------------------------------------- lm-evaluation-harness


def _write_task(directory: Path) -> None:
    data = directory / "local_mc.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (directory / "local_mc.yaml").write_text(
        "task: ee_local_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n"
    )


def lm_eval_loglikelihoods(url: str, model: str, task_dir: str) -> dict:
    """Run lm-evaluation-harness' ``local-completions`` on the local task (a script, so its
    imports and logging stay out of the test process); returns ``{context + choice: ll}``."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=f"model={model},base_url={url}/v1/completions,tokenizer_backend=remote,"
        "num_concurrent=1,max_retries=1",
        tasks=["ee_local_mc"],
        task_manager=TaskManager(include_path=task_dir),
        log_samples=True,
    )
    scores = {}
    for sample in out["samples"]["ee_local_mc"]:
        for (context, continuation), response in zip(sample["arguments"], sample["resps"]):
            scores[context + continuation] = response[0][0]
    return scores


@pytest.mark.parametrize("head", ["final", "exit"])
def test_lm_evaluation_harness_scores_like_the_forward(served, head, tmp_path):
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is an optional extra")
    _write_task(tmp_path)
    model = "tiny" if head == "final" else f"tiny@exit{EXIT}"
    script = (
        "import json, sys\n"
        "from tests.distributed.test_openai_server import lm_eval_loglikelihoods\n"
        "if __name__ == '__main__':\n"
        "    print(json.dumps(lm_eval_loglikelihoods(*sys.argv[1:])))\n"
    )
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}  # fmt: skip
    run = subprocess.run(
        [sys.executable, "-c", script, served["urls"]["tp1"], model, str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    scores = json.loads(run.stdout.strip().splitlines()[-1])
    assert sorted(scores) == sorted(_lm_eval_texts())
    for text, loglikelihood in scores.items():
        reference = served["reference"][text]
        question = text.rsplit(" ", 1)[0]
        num_context = len(question.encode())  # byte-level: one token per byte
        expected = sum(reference[head][num_context:])
        assert abs(loglikelihood - expected) < 1e-4, (text, loglikelihood, expected)


def test_health_names_the_model(served):
    with urllib.request.urlopen(f"{served['urls']['tp1']}/health", timeout=10) as response:
        assert json.loads(response.read())["model"] == "tiny"
