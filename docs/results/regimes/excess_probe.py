"""Does the excess loss l - l_ref tell junk from code, and for how long? (docs/regimes.md)

The junk probe's protocol (junk_probe.py: a plain PyTorch loop, uniform order, constant lr)
on the first ROWS training rows of `recipe:code=1,junk=0.3`, plus one or more reference
models (Hugging Face directories, e.g. the `run/model` of an `es-llm` reference cache entry
trained on clean code with this corpus's tokenizer). At a few steps it measures every k-th
row's mean per-token loss `l` (no grad) and, for each reference, reports per row kind (junk:
most tokens from junk documents) the mean excess, the share of rows whose excess is above 0
(what survives method excess's clip at 0), and the junk share of the upper half by excess.

    python docs/results/regimes/excess_probe.py --reference r32=DIR --out excess_probe.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from probe_loop import junk_rows, row_losses, train_uniform

from es_llm.model import build_model, load_model, load_model_preset, resolve_model

PROBE_STEPS = (0, 8, 16, 32, 48, 64, 96, 128, 160, 192)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1024, help="training rows used (default 1024)")
    ap.add_argument("--steps", type=int, default=192, help="optimizer steps (default 192)")
    ap.add_argument(
        "--reference",
        action="append",
        required=True,
        metavar="NAME=DIR",
        help="a reference model directory (repeatable)",
    )
    ap.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = ap.parse_args()
    torch.manual_seed(0)
    corpus, tokens, junk_rows_mask = junk_rows(args.rows, max_val_samples=128)
    probe = torch.arange(0, args.rows, max(1, args.rows // 512))
    is_junk = junk_rows_mask[probe.numpy()]

    refs: dict[str, np.ndarray] = {}
    for item in args.reference:
        name, _, path = item.partition("=")
        ref = load_model(resolve_model(path), vocab_size=corpus.vocab_size, seq_len=128)
        refs[name] = row_losses(ref, tokens, probe)
        print(
            f"reference {name}: junk l_ref {refs[name][is_junk].mean():.4f}, "
            f"code l_ref {refs[name][~is_junk].mean():.4f}",
            flush=True,
        )
    model = build_model(load_model_preset("gpt2-tiny"), vocab_size=corpus.vocab_size, seq_len=128)
    half = len(probe) // 2
    records = []

    def report(step: int) -> None:
        loss = row_losses(model, tokens, probe)
        rec = {
            "step": step,
            "junk_l": round(float(loss[is_junk].mean()), 4),
            "code_l": round(float(loss[~is_junk].mean()), 4),
        }
        for name, l_ref in refs.items():
            x = loss - l_ref
            top = np.argsort(-x, kind="stable")[:half]
            rec[name] = {
                "junk_excess": round(float(x[is_junk].mean()), 4),
                "code_excess": round(float(x[~is_junk].mean()), 4),
                "junk_positive": round(float((x[is_junk] > 0).mean()), 4),
                "code_positive": round(float((x[~is_junk] > 0).mean()), 4),
                "junk_share_of_top_half": round(float(is_junk[top].mean()), 4),
            }
        records.append(rec)
        print(json.dumps(rec), flush=True)

    train_uniform(model, tokens, args.steps, report, at=PROBE_STEPS)
    summary = {
        "rows": args.rows,
        "junk_rows": int(is_junk.sum()),
        "code_rows": int((~is_junk).sum()),
        "references": {item.partition("=")[0]: item.partition("=")[2] for item in args.reference},
        "probes": records,
    }
    args.out.write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
