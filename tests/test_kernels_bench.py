"""The kernel benchmark runs end to end at tiny shapes and writes its JSON (no timing asserts)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from es_llm.kernels import bench

# Largest per-row cross-entropy of the bench's inputs (randn logits, V = 300): ln V + a few.
MAX_ROW_LOSS = 12.0


def loss_tolerance(dtype: str, rows_per_sequence: int) -> float:
    """Allowed |loss - reference| for a per-sequence loss computed from `dtype` logits.

    fp32: the paths differ only in summation order. bf16/fp16: PyTorch eager returns each
    row's cross-entropy in the logits' dtype (rounded to half an ulp), and a sequence sums
    `rows_per_sequence` such rows; the reference upcasts the same logits to fp32.
    """
    if dtype == "float32":
        return 1e-3
    eps = torch.finfo(getattr(torch, dtype)).eps
    return rows_per_sequence * MAX_ROW_LOSS * eps / 2 + 1e-3


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
        ]
    )
    result = bench.run(args)
    on_disk = json.loads((tmp_path / "kernels_bench.json").read_text())
    assert on_disk == json.loads(json.dumps(result))
    methods = {(r["kernel"], r["method"]): r for r in result["results"]}
    eager = methods[("per_sample_loss", "eager")]
    assert eager["status"] == "ok" and eager["ms"] > 0 and eager["gbps"] > 0
    # the tolerance of the dtype that actually ran (bf16 on a GPU, fp32 on the CPU)
    assert eager["dtype"] == ("float32" if result["device"] == "cpu" else "bfloat16")
    assert eager["max_abs_err"] < loss_tolerance(eager["dtype"], 16)
    assert methods[("fused_linear", "reference (chunked)")]["tflops"] > 0
    if result["device"] == "cpu":
        tri = methods[("per_sample_loss", "triton")]
        assert tri["status"] == "not measured" and tri["ms"] is None  # never estimated
        assert result["peak_bw_gbps"] is None
        assert any("need a GPU" in note for note in result["notes"])
    else:  # the Triton kernel reads the bf16 logits and accumulates in fp32, as the reference
        tri = methods[("per_sample_loss", "triton")]
        assert tri["status"] == "ok" and tri["ms"] > 0
        assert tri["max_abs_err"] < loss_tolerance(tri["dtype"], 16)


def test_every_flag_has_help() -> None:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    missing = [a.dest for a in parser._actions if a.dest != "help" and not a.help]
    assert missing == []


def test_peak_bandwidth_table() -> None:
    assert bench.peak_bandwidth_gbps("NVIDIA H100 80GB HBM3") == 3350.0
    assert bench.peak_bandwidth_gbps("NVIDIA H100 PCIe") == 2000.0
    assert bench.peak_bandwidth_gbps("NVIDIA H200") == 4800.0
    assert bench.peak_bandwidth_gbps("NVIDIA A100-SXM4-80GB") == 2039.0
    assert bench.peak_bandwidth_gbps("NVIDIA A100-SXM4-40GB") == 1555.0
    assert bench.peak_bandwidth_gbps("NVIDIA GeForce RTX 4090") is None
