"""A plain PyTorch training loop of the same model and batch as `es-llm train`.

The baseline of the GPU check: what a user gets without es-llm and without DeepSpeed. Same
corpus, model preset, batch geometry (micro-batch x gradient accumulation from the DeepSpeed
config, at one rank), optimizer hyper-parameters and gradient clipping; bf16 autocast and
PyTorch's fused AdamW on a GPU (fp32 and the foreach AdamW on the CPU, where it serves as a
test with a tiny model). Uniform order, a fresh permutation each epoch.

It never waits for the GPU inside the loop: the token table sits on the device, step times
come from CUDA events read after the last step, losses stay on the device until then. Writes OUT/summary.json and
OUT/metrics.jsonl in the layout of `es-llm train` (method "plain", only the keys that apply).

    python -m es_llm.tools.bench_plain --config zero1_bf16 --model gpt2-124m --seq-len 256 \\
        --steps 300 --out runs/plain
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from es_llm.errors import InputError
from es_llm.sampling.timing import TIMERS


@dataclass
class PlainOptions:
    out: Path
    config: str = "cpu_tiny"
    model: str = "gpt2-tiny"
    data: str | None = None
    tokenizer: str | None = None
    cache_dir: str | None = None
    seq_len: int = 128
    vocab_size: int = 4096
    max_train_samples: int | None = None
    steps: int = 100
    seed: int = 0
    device: str = "auto"


def _device(want: str) -> torch.device:
    if want == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: torch sees no GPU; use --device cpu or auto")
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _optimizer(
    model: torch.nn.Module, ds_config: dict[str, Any], device: torch.device
) -> torch.optim.Optimizer:
    """torch AdamW with the DeepSpeed config's hyper-parameters; fused on a GPU."""
    opt = ds_config.get("optimizer") or {}
    kind = str(opt.get("type", "AdamW")).lower()
    if kind not in ("adamw", "adam"):
        raise InputError(
            f"the plain loop mirrors Adam/AdamW only; the config's optimizer is {opt.get('type')!r}"
        )
    p = opt.get("params") or {}
    return torch.optim.AdamW(
        model.parameters(),
        lr=float(p.get("lr", 1e-3)),
        betas=tuple(p.get("betas", (0.9, 0.999))),
        eps=float(p.get("eps", 1e-8)),
        weight_decay=float(p.get("weight_decay", 0.01 if kind == "adamw" else 0.0)),
        fused=device.type == "cuda",
        foreach=None if device.type == "cuda" else True,
    )


class _Clock:
    """Per-step times of fwd+bwd and optimizer: CUDA events on a GPU (read once at the end),
    perf_counter on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[Any, Any, Any]] = []

    def mark(self) -> Any:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def add(self, start: Any, after_bwd: Any, after_opt: Any) -> None:
        self.marks.append((start, after_bwd, after_opt))

    def seconds(self) -> list[tuple[float, float]]:
        """(fwd+bwd s, optimizer s) of every step; waits for the GPU once."""
        if self.cuda:
            torch.cuda.synchronize()
            return [(a.elapsed_time(b) / 1e3, b.elapsed_time(c) / 1e3) for a, b, c in self.marks]
        return [(b - a, c - b) for a, b, c in self.marks]


def run_plain(opts: PlainOptions, on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Train `opts.steps` optimizer steps; write and return the summary.

    `on_step(step)` (optional) is called on the host after each step is queued (the sync
    counter marks steps with it); it must not wait for the GPU."""
    from es_llm.data import load_corpus
    from es_llm.drivers.deepspeed.dsconfig import load_ds_config
    from es_llm.model import build_model, count_parameters, load_model_preset
    from es_llm.sampling.config import EvolvedSamplingConfig
    from es_llm.sampling.plan import RunPlan

    if opts.steps < 1:
        raise InputError(f"--steps must be >= 1, got {opts.steps}")
    device = _device(opts.device)
    torch.manual_seed(opts.seed)
    ds_config = load_ds_config(opts.config)
    corpus = load_corpus(
        opts.data,
        seq_len=opts.seq_len,
        cache_dir=opts.cache_dir,
        vocab_size=opts.vocab_size,
        max_train_samples=opts.max_train_samples,
        max_val_samples=1,
        tokenizer=opts.tokenizer,
        progress=False,
    )
    n = len(corpus.train)
    # uniform at one rank: the same geometry as es-llm train; as many epochs as the steps need
    uniform = EvolvedSamplingConfig(method="uniform")
    one_epoch = RunPlan.build(ds_config, uniform, dp_size=1, num_samples=n, epochs=1)
    epochs = -(-opts.steps // one_epoch.plain_steps_per_epoch)
    plan = RunPlan.build(
        ds_config, uniform, dp_size=1, num_samples=n, epochs=epochs, max_steps=opts.steps
    )
    geo = plan.geo
    # the whole token table on the device once: no host-to-device copy inside a step
    tokens = torch.from_numpy(np.asarray(corpus.train["input_ids"], dtype=np.int64)).to(device)
    model = build_model(
        load_model_preset(opts.model), vocab_size=corpus.vocab_size, seq_len=corpus.seq_len
    ).to(device)
    model.train()
    optimizer = _optimizer(model, ds_config, device)
    clip = float(ds_config.get("gradient_clipping") or 0.0)
    bf16 = bool((ds_config.get("bf16") or {}).get("enabled")) and device.type == "cuda"

    gen = torch.Generator().manual_seed(opts.seed)

    def permutation() -> torch.Tensor:  # on the device: a blocking copy per epoch, not per step
        return torch.randperm(n, generator=gen).to(device)

    order, pos, epoch = permutation(), 0, 0
    clock = _Clock(device)
    losses: list[torch.Tensor] = []
    if device.type == "cuda":
        torch.cuda.synchronize()
    t_start = time.perf_counter()
    for step in range(1, plan.total_steps + 1):
        if pos + geo.train_batch > n:
            order, pos, epoch = permutation(), 0, epoch + 1
        batch = order[pos : pos + geo.train_batch]
        pos += geo.train_batch
        start = clock.mark()
        step_loss = torch.zeros((), device=device)
        for mb_idx in batch.split(geo.micro):
            mb = tokens[mb_idx]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = model(input_ids=mb, labels=mb).loss / geo.grad_accum
            loss.backward()
            step_loss += loss.detach().float()
        after_bwd = clock.mark()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clock.add(start, after_bwd, clock.mark())
        losses.append(step_loss)
        if on_step is not None:
            on_step(step)
    per_step = clock.seconds()  # the one wait for the GPU
    wall = time.perf_counter() - t_start
    train_losses = torch.stack(losses).tolist()

    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "metrics.jsonl").open("w") as fh:
        for i, ((fb, op), loss) in enumerate(zip(per_step, train_losses, strict=True)):
            rec = {
                "type": "step",
                "step": i + 1,
                "phase": "plain",
                "train_loss": loss,
                "selected": geo.train_batch,
                "scored": 0,
                "step_s": fb + op,
            }
            fh.write(json.dumps(rec) + "\n")
    fwd_bwd = sum(fb for fb, _ in per_step)
    optim = sum(op for _, op in per_step)
    timers = dict.fromkeys(TIMERS, 0.0) | {"train_fwd_bwd_s": fwd_bwd, "optimizer_s": optim}
    summary: dict[str, Any] = {
        "method": "plain",
        "world_size": 1,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": "bf16 autocast" if bf16 else "fp32",
        "optimizer": "torch AdamW (fused)" if device.type == "cuda" else "torch AdamW (foreach)",
        "wall_clock_s": wall,
        "steps": opts.steps,
        "epochs": epoch + 1,
        "bp_samples": opts.steps * geo.train_batch,
        "scored_samples": 0,
        "final_train_loss": train_losses[-1],
        "time_breakdown_s": timers,
        "time_breakdown_per_step_s": {k: v / opts.steps for k, v in timers.items()},
        "train_samples": n,
        "seq_len": corpus.seq_len,
        "vocab_size": corpus.vocab_size,
        "model": opts.model,
        "model_parameters": count_parameters(model),
        "batch": {
            "train_batch_size": geo.train_batch,
            "micro_batch_size": geo.micro,
            "gradient_accumulation_steps": geo.grad_accum,
        },
        "gradient_clipping": clip,
        "seed": opts.seed,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="cpu_tiny", help="DeepSpeed JSON config whose batch "
                   "geometry, optimizer and clipping the loop copies (default: %(default)s)")  # fmt: skip
    p.add_argument("--model", default="gpt2-tiny", help="model preset (default: %(default)s)")
    p.add_argument("--data", default=None, help="training data, as for es-llm train")
    p.add_argument("--tokenizer", default=None, help="tokenizer, as for es-llm train")
    p.add_argument("--cache-dir", default=None, help="corpus cache, as for es-llm train")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default: %(default)s)")  # fmt: skip
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary (default: %(default)s)")  # fmt: skip
    p.add_argument("--max-train-samples", type=int, default=None, help="first N sequences only")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed (default: %(default)s)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="auto = the GPU when torch sees one (default: auto)")  # fmt: skip
    p.add_argument("--out", default="runs/plain", help="output directory (default: %(default)s)")


def main(argv: list[str] | None = None, on_step: Callable[[int], None] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m es_llm.tools.bench_plain",
        description="Plain PyTorch training loop of the same model and batch as es-llm train.",
    )
    add_arguments(parser)
    a = parser.parse_args(argv)
    opts = PlainOptions(
        out=Path(a.out), config=a.config, model=a.model, data=a.data, tokenizer=a.tokenizer,
        cache_dir=a.cache_dir, seq_len=a.seq_len, vocab_size=a.vocab_size,
        max_train_samples=a.max_train_samples, steps=a.steps, seed=a.seed, device=a.device,
    )  # fmt: skip
    try:
        s = run_plain(opts, on_step=on_step)
    except InputError as e:
        print(f"bench_plain: error: {e}", file=sys.stderr)
        return 2
    tok_s = s["bp_samples"] * s["seq_len"] / s["wall_clock_s"]
    print(f"plain loop: {s['steps']} steps, {tok_s:.0f} tokens/s on {s['device']}; in {opts.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
