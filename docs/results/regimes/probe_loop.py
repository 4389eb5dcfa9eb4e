"""What the two probes share: the junk mixture's rows labelled junk or code, and the plain
uniform training loop they measure along (junk_probe.py, excess_probe.py)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from es_llm.data import load_corpus

DATA, VAL_DATA = "recipe:code=1,junk=0.3", "recipe:code=1"


def junk_rows(rows: int, max_val_samples: int) -> tuple[Any, torch.Tensor, np.ndarray]:
    """(corpus, its first `rows` training rows as int64 tokens, whether each is mostly junk).

    A row is junk when most of its tokens come from junk documents (the corpus cache's
    per-row component counts)."""
    corpus = load_corpus(
        DATA,
        val_data=VAL_DATA,
        seq_len=128,
        vocab_size=4096,
        max_train_samples=rows,
        max_val_samples=max_val_samples,
        progress=False,
    )
    entry = Path(corpus.cache_path)
    names = json.loads((entry / "meta.json").read_text())["components"]
    row_tokens = np.load(entry / "train_row_tokens.npy")[:rows]
    is_junk = row_tokens[:, names.index("junk")] / row_tokens.sum(axis=1) > 0.5
    tokens = torch.from_numpy(np.asarray(corpus.train["input_ids"], dtype=np.int64))
    return corpus, tokens, is_junk


def train_uniform(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    steps: int,
    report: Callable[[int], None],
    at: tuple[int, ...],
) -> None:
    """`steps` AdamW steps at the cpu_tiny config's lr, betas and weight decay (constant lr,
    clip 1.0), batches of 32 in two micro-batches, uniform order reshuffled each epoch;
    `report(step)` before the first step, after each step in `at` and after the last."""
    report(0)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1)
    rows = tokens.size(0)
    gen = torch.Generator().manual_seed(0)
    order, pos = torch.randperm(rows, generator=gen), 0
    for step in range(1, steps + 1):
        if pos + 32 > rows:
            order, pos = torch.randperm(rows, generator=gen), 0
        for ids in order[pos : pos + 32].split(16):
            x = tokens[ids]
            (model(input_ids=x, labels=x).loss / 2).backward()
        pos += 32
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step in at or step == steps:
            report(step)


def row_losses(model: torch.nn.Module, tokens: torch.Tensor, rows: torch.Tensor) -> np.ndarray:
    """Each of `rows`' mean per-token loss under `model` (no grad, its mode left as it was)."""
    was = model.training
    model.eval()
    out = []
    with torch.no_grad():
        for ids in rows.split(64):
            x = tokens[ids]
            logits = model(input_ids=x).logits[:, :-1].float()
            loss = F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")
            out.append(loss.mean(dim=1))
    model.train(was)
    return torch.cat(out).numpy()
