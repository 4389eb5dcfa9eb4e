"""TEST ONLY: the GPT-2 export of the Megatron driver computes what the Megatron model does.

One CPU process (tests/megatron_shim.py applied): a gpt2-tiny Megatron GPTModel at TP=1 with
every weight set to random values (LayerNorm weights and biases included, so a mis-mapped or
mis-ordered tensor shows), exported with `export_gpt2` and loaded with `transformers`; the
logits of both on the same tokens are compared. Prints one JSON line: the largest absolute
difference and the logits' scale.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import megatron_shim  # noqa: E402

megatron_shim.apply()

import torch  # noqa: E402
from megatron.core import parallel_state  # noqa: E402
from tokenizers import Tokenizer, models  # noqa: E402
from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast  # noqa: E402

from es_llm import dist  # noqa: E402
from es_llm.drivers.megatron.export import export_gpt2  # noqa: E402
from es_llm.drivers.megatron.model import build_gpt  # noqa: E402
from es_llm.model import load_model_preset, model_config  # noqa: E402

out = Path(sys.argv[1])
vocab, seq = 256, 32
dist.ensure_launcher_env()
torch.distributed.init_process_group("gloo")
parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
preset = load_model_preset("gpt2-tiny")
parts = build_gpt(preset, vocab_size=vocab, seq_len=seq, seed=0)
g = torch.Generator().manual_seed(1)
with torch.no_grad():
    for p in parts.model.parameters():
        p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.dim() == 1 else 0.0))
tokenizer = PreTrainedTokenizerFast(
    tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
)
path = export_gpt2(
    parts.model,
    model_config(preset, vocab_size=vocab, seq_len=seq),
    out,
    lambda: tokenizer,
    tp_group=parallel_state.get_tensor_model_parallel_group(),
)
tokens = torch.randint(0, vocab, (3, seq - 1), generator=g)
positions = torch.arange(seq - 1).expand_as(tokens)
parts.model.eval()
with torch.no_grad():
    mine = parts.model(tokens, positions, None).float()  # [b, s, vocab] logits
    hf = GPT2LMHeadModel.from_pretrained(path, dtype=torch.float32).eval()
    theirs = hf(input_ids=tokens).logits.float()
print(json.dumps({"max_abs_diff": float((mine - theirs).abs().max()),
                  "logit_scale": float(theirs.abs().max()),
                  "shape": list(theirs.shape)}), flush=True)  # fmt: skip
parallel_state.destroy_model_parallel()
dist.destroy()
