"""Which rows of the junk mixture have the highest loss, and when? (the probe of docs/regimes.md)

Trains the CPU default model with a plain PyTorch loop (uniform order, AdamW at the
cpu_tiny config's lr, betas and weight decay, constant lr, clip 1.0) on
`recipe:code=1,junk=0.3` and, at a few steps, measures the mean per-token loss of every
k-th training row (no grad). Rows are labelled junk when most of their tokens come from junk
documents (the corpus cache's per-row component counts). Prints one line per probe and
writes them to OUT (JSON).

    python docs/results/regimes/junk_probe.py --rows 2048 --steps 384 --out probe.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from probe_loop import junk_rows, row_losses, train_uniform

from es_llm.model import build_model, load_model_preset

PROBE_STEPS = (0, 8, 16, 32, 64, 128, 192, 256, 384, 512)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=2048, help="training rows used (default 2048)")
    ap.add_argument("--steps", type=int, default=384, help="optimizer steps (default 384)")
    ap.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = ap.parse_args()
    torch.manual_seed(0)
    corpus, tokens, junk_rows_mask = junk_rows(args.rows, max_val_samples=64)
    model = build_model(load_model_preset("gpt2-tiny"), vocab_size=corpus.vocab_size, seq_len=128)
    probe = torch.arange(0, args.rows, max(1, args.rows // 512))
    is_junk = junk_rows_mask[probe.numpy()]

    records = []

    def report(step: int) -> None:
        loss = row_losses(model, tokens, probe)
        junk, code = loss[is_junk], loss[~is_junk]
        top = np.argsort(-loss, kind="stable")[: int(is_junk.sum())]
        rec = {
            "step": step,
            "junk_rows": int(is_junk.sum()),
            "code_rows": int((~is_junk).sum()),
            "junk_mean": round(float(junk.mean()), 4),
            "junk_sd": round(float(junk.std()), 4),
            "code_mean": round(float(code.mean()), 4),
            "code_sd": round(float(code.std()), 4),
            # of the rows with the highest losses (as many as there are junk rows), the junk share
            "junk_share_of_top": round(float(is_junk[top].mean()), 4),
        }
        records.append(rec)
        print(json.dumps(rec), flush=True)

    train_uniform(model, tokens, args.steps, report, at=PROBE_STEPS)
    args.out.write_text(json.dumps({"rows": args.rows, "probes": records}, indent=1) + "\n")


if __name__ == "__main__":
    main()
