"""TEST ONLY: the Megatron side of the export check (tests/test_megatron_driver.py).

One CPU process (tests/megatron_shim.py applied), TP=1: for a GPT-2 and a Llama preset, a
Megatron GPTModel with every weight set to random values (norm weights and biases included,
so a mis-mapped or mis-ordered tensor shows) is exported with `export_hf` to OUT/<preset>/model,
and the tokens and the Megatron model's logits on them are saved to OUT/<preset>/logits.pt.
The test loads the exported directory with `transformers` in its own process, where the shim
is not applied (transformers' `from_pretrained` leaves Llama's rotary buffer uninitialised in a
process whose torch factories the shim wrapped), and compares the logits.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import megatron_shim  # noqa: E402

megatron_shim.apply()

import torch  # noqa: E402
from megatron.core import parallel_state  # noqa: E402
from tokenizers import Tokenizer, models  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from es_llm import dist  # noqa: E402
from es_llm.drivers.megatron.export import export_hf  # noqa: E402
from es_llm.drivers.megatron.model import build_gpt  # noqa: E402
from es_llm.model import load_model_preset, model_config  # noqa: E402

out = Path(sys.argv[1])
vocab, seq = 256, 32
dist.ensure_launcher_env()
torch.distributed.init_process_group("gloo")
parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
tokenizer = PreTrainedTokenizerFast(
    tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
)
for name in ("gpt2-tiny", "llama-tiny"):
    preset = load_model_preset(name)
    parts = build_gpt(preset, vocab_size=vocab, seq_len=seq, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in parts.model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.dim() == 1 else 0.0))
    export_hf(
        parts.model,
        model_config(preset, vocab_size=vocab, seq_len=seq),
        out / name,
        lambda: tokenizer,
        tp_group=parallel_state.get_tensor_model_parallel_group(),
    )
    tokens = torch.randint(0, vocab, (3, seq - 1), generator=g)
    positions = torch.arange(seq - 1).expand_as(tokens)
    parts.model.eval()
    with torch.no_grad():
        logits = parts.model(tokens, positions, None).float()  # [b, s, vocab]
    torch.save({"tokens": tokens, "logits": logits}, out / name / "logits.pt")
parallel_state.destroy_model_parallel()
dist.destroy()
