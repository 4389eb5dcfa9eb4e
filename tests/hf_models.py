"""Tiny Hugging Face model and tokenizer directories for tests: built here, nothing downloaded.

Also the reference validation loss of an exported model, computed with `transformers` alone
(its own shifted cross-entropy), for the end-to-end tests that check `OUT/model`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from es_llm.data.tokenizer import EOD_TOKEN, train_bpe

TEXT = [
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i * i)\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "import os\nprint(os.getcwd())\n",
    "The quick brown fox jumps over the lazy dog.\n",
] * 4


def save_tokenizer(folder: Path, vocab_size: int = 300) -> Path:
    """A byte-level BPE of about `vocab_size` ids, saved as a Hugging Face tokenizer directory."""
    from transformers import PreTrainedTokenizerFast

    tok = train_bpe(TEXT, vocab_size)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOD_TOKEN, bos_token=EOD_TOKEN)
    hf.save_pretrained(folder)
    return folder


def save_model(folder: Path, family: str, *, vocab_size: int = 320, positions: int = 64) -> Path:
    """A 2-layer GPT-2 or Llama with random weights (seed 0), saved with `save_pretrained`."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if family == "gpt2":
        config = GPT2Config(
            vocab_size=vocab_size,
            n_positions=positions,
            n_embd=32,
            n_layer=2,
            n_head=2,
            bos_token_id=0,  # the tokenizer's end-of-document token
            eos_token_id=0,
        )
        model = GPT2LMHeadModel(config)
    else:
        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=positions,
            bos_token_id=0,
            eos_token_id=0,
        )
        model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    return folder


def pretrained_dir(folder: Path, family: str, **kw) -> Path:
    """A model directory with its own tokenizer, as a pretrained checkpoint on the hub has."""
    save_model(folder, family, **kw)
    save_tokenizer(folder)
    return folder


def reload_val_loss(model_dir: Path, cache: Path, run_args: list[str]) -> float:
    """The validation loss of `model_dir` reloaded by `transformers` on the validation rows of
    the run started with `run_args` (its corpus, a cache hit in `cache`), token-weighted as the
    run computes it. The tokenizer saved beside the weights must load too."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from es_llm.cli import build_parser
    from es_llm.data import load_corpus
    from es_llm.model import tokenizer_for

    args = build_parser(["train"]).parse_args(["train", *run_args])
    corpus = load_corpus(
        args.data,
        val_data=args.val_data,
        seq_len=args.seq_len,
        vocab_size=args.vocab_size,
        max_val_samples=args.max_val_samples,
        tokenizer=tokenizer_for(args.model, args.tokenizer),
        cache_dir=cache,
        progress=False,
    )
    assert AutoTokenizer.from_pretrained(model_dir).eos_token == EOD_TOKEN
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows = np.asarray(corpus.val["input_ids"], dtype=np.int64)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows), 8):
            x = torch.from_numpy(rows[i : i + 8])
            n = x.numel() - x.size(0)  # every position but the last predicts the next token
            total += float(model(input_ids=x, labels=x).loss) * n
            count += n
    return total / count
