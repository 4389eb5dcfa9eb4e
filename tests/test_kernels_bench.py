"""The kernel benchmark runs end to end at tiny shapes and writes its JSON (no timing asserts)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from es_llm.kernels import bench


def test_bench_writes_json(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(
        [
            "--out",
            str(tmp_path),
            "--n",
            "64",
            "--vocab",
            "300",
            "--hidden",
            "16",
            "--seq-len",
            "16",
            "--iters",
            "1",
            "--warmup",
            "0",
            "--kernels",
            "ce",
            "linear",
            "es",
        ]
    )
    result = bench.run(args)
    on_disk = json.loads((tmp_path / "kernels_bench.json").read_text())
    assert on_disk == json.loads(json.dumps(result))
    methods = {(r["kernel"], r["method"]): r for r in result["results"]}
    eager = methods[("per_sample_loss", "eager")]
    assert eager["status"] == "ok" and eager["ms"] > 0 and eager["gbps"] > 0
    assert eager["max_abs_err"] < 1e-3
    assert methods[("fused_linear", "reference (chunked)")]["tflops"] > 0
    assert ("fused_es_scores", "reference") in methods
    if result["device"] == "cpu":
        tri = methods[("per_sample_loss", "triton")]
        assert tri["status"] == "not measured" and tri["ms"] is None  # never estimated
        assert result["peak_bw_gbps"] is None
        assert any("need a GPU" in note for note in result["notes"])


def test_peak_bandwidth_table() -> None:
    assert bench.peak_bandwidth_gbps("NVIDIA H100 80GB HBM3") == 3350.0
    assert bench.peak_bandwidth_gbps("NVIDIA H100 PCIe") == 2000.0
    assert bench.peak_bandwidth_gbps("NVIDIA H200") == 4800.0
    assert bench.peak_bandwidth_gbps("NVIDIA A100-SXM4-80GB") == 2039.0
    assert bench.peak_bandwidth_gbps("NVIDIA A100-SXM4-40GB") == 1555.0
    assert bench.peak_bandwidth_gbps("NVIDIA GeForce RTX 4090") is None
