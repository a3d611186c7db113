"""``tools/write_results.py``: every number in the results folder comes from its input JSONs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def load_tool():
    spec = importlib.util.spec_from_file_location("write_results", REPO / "tools/write_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench_record(name: str, layer_ms: float) -> dict:
    row = dict(
        confidence_measure="learned", tokens_per_second=10.0, speedup=1.0, ideal_speedup=1.0,
        agreement=1.0, rouge_l=1.0, mean_exit_layer=4.0, exit_shares={"4": 1.0},
        pipeline_parallel_size=1, num_draft_tokens=None, draft_exit_depth=None, threshold=None,
    )  # fmt: skip
    rows = [
        {**row, "method": "full"},
        {**row, "method": "recompute", "threshold": 0.5, "speedup": 1.25, "agreement": 0.9,
         "exit_shares": {"2": 0.5, "4": 0.5}, "mean_exit_layer": 3.0},
        {**row, "method": "speculative", "num_draft_tokens": 3, "draft_exit_depth": 2,
         "speedup": 0.6},
    ]  # fmt: skip
    per_call = {
        "layer@1": layer_ms, "layer@2": 1.5 * layer_ms,
        "exit2/mlp_norm@1": 0.1, "exit2/mlp@1": 0.7, "exit2/norm@1": 0.2,
        "exit2/confidence_head@1": 0.25, "exit2/output_layer@1": 6.0,
    }  # fmt: skip
    unit = {"per_call_ms": per_call, "exit_head_ms": {"2": 7.25}, "final_head_ms": 6.5}
    meta = {
        "argv": ["--load", "ckpt dir"],
        "torch_threads": 2,
        "cpu_count": 2,
        "iteration": 9,
        "load_average": [1.0, 0.5, 0.25],
        "seconds": 12.0,
        "pipeline_parallel_size": 1,
    }
    return {"meta": meta, "rows": rows, "unit_costs": unit}


def test_results_folder(tmp_path):
    tool = load_tool()
    paths = []
    for name, layer_ms in (("bench_a", 2.0), ("bench_b", 3.0)):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(bench_record(name, layer_ms)))
        paths.append(str(path))
    quality = {"heads": [{"head": "2", "perplexity": 50.0, "agreement": 0.4,
                          "confidence_accuracy": 0.8, "confidence_auc": 0.75},
                         {"head": "final", "perplexity": 10.0, "agreement": 1.0}]}  # fmt: skip
    (tmp_path / "q.json").write_text(json.dumps(quality))
    notes = tmp_path / "notes.md"
    notes.write_text("**measured notes**")
    out = tmp_path / "out"
    assert tool.main(["--bench", *paths, "--quality-after", str(tmp_path / "q.json"),
                      "--out", str(out), "--notes", str(notes)]) == 0  # fmt: skip

    results = json.loads((out / "results.json").read_text())
    assert len(results["rows"]) == 6
    assert {"method", "threshold", "tokens_per_second", "speedup", "agreement",
            "mean_exit_layer"} <= set(results["rows"][0])  # fmt: skip
    assert [r["source"] for r in results["rows"]].count("bench_b.json") == 3
    text = (out / "README.md").read_text()
    assert "**measured notes**" in text
    assert "| recompute, learned | 0.50 | 10.0 | 1.25 |" in text
    assert "| speculative, k=3, exit 2 |" in text
    # layer 1 pos | 2 pos | transform 0.1+0.7+0.2 | confidence | projection | final | decisions
    assert "| bench_a | 2.00 | 3.00 | 1.00 | 0.25 | 6.00 | 6.50 | 1.25 | 7.00 |" in text
    assert "| bench_b | 3.00 | 4.50 |" in text
    assert "`tools/bench_generation.py --load 'ckpt dir'`" in text
    assert "| 2 | - | 50.0 | - | 0.400 | 0.800 | 0.750 |" in text
    assert (out / "speedup_vs_agreement.png").stat().st_size > 0
    assert (out / "exit_usage.png").stat().st_size > 0
