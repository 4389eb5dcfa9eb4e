"""es_llm.dist.share_cpu_threads: each local rank gets its share of the cores on CPU, unless
OMP_NUM_THREADS says otherwise.

The test session runs with OMP_NUM_THREADS=1 (tests/conftest.py), so every training run the
tests start takes the other branch; the default one is checked here, in this process, with
the thread count restored after."""

from __future__ import annotations

import os

import pytest
import torch

from es_llm import dist


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


@pytest.mark.parametrize(("local", "var"), [(1, "LOCAL_WORLD_SIZE"), (2, "LOCAL_SIZE")])
def test_each_local_rank_gets_its_share_of_the_cores(monkeypatch, threads, local, var):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setenv(var, str(local))
    torch.set_num_threads(7)
    dist.share_cpu_threads()
    assert torch.get_num_threads() == max(1, _cores() // local)


def test_omp_num_threads_wins(monkeypatch, threads):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    torch.set_num_threads(5)
    dist.share_cpu_threads()
    assert torch.get_num_threads() == 5  # left alone
