"""What a new user's machine does from the checkout's root.

Python puts the working directory first on `sys.path` (`python -m ...`, `python -c ...`,
`python -m pytest`), so a top-level folder with an `__init__.py` there is imported in place of
an installed package of the same name. transformers 5 imports Hugging Face's `kernels`
package when it loads GPT-2; a top-level `kernels/__init__.py` in the checkout broke the test
suite, the launcher's ranks and `es-llm compare`'s worker on a fresh machine.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# run from the checkout's root, as `python3 -m pytest` and the launcher's ranks are
FROM_ROOT = """
import kernels, os, sys
# the installed package, not the checkout's kernels/ folder (a .venv inside the root is fine)
folder = os.path.join(os.getcwd(), 'kernels') + os.sep
assert not os.path.abspath(kernels.__file__ or '').startswith(folder), kernels.__file__
from transformers import GPT2Config, GPT2LMHeadModel
model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=32, n_positions=8))
import torch
ids = torch.arange(8).reshape(1, 8) % 32
out = model(input_ids=ids)
from es_llm.kernels import per_sample_loss
loss, count = per_sample_loss(out.logits[:, :-1], ids[:, 1:], backend='reference')
import es_llm.model, es_llm.tools.compare, es_llm.drivers.deepspeed.loop  # noqa: F401
assert (es_llm.model.configs_dir() / 'ds' / 'cpu_tiny.json').is_file()
print('ok', int(count.item()))
"""


def test_transformers_gpt2_and_the_project_import_from_the_checkout_root() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", FROM_ROOT], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "ok 7"


def test_no_top_level_folder_but_es_llm_is_importable_from_the_root() -> None:
    # a regular package or a module at the root would shadow an installed one of that name
    shadowing = [
        p.name
        for p in REPO.iterdir()
        if p.name != "es_llm"
        and not p.name.startswith(".")
        and ((p.is_dir() and (p / "__init__.py").exists()) or p.suffix == ".py")
    ]
    assert shadowing == []


def test_ci_runs_exactly_the_readme_test_command_in_a_new_virtual_environment() -> None:
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    test_cmd = next(b for b in blocks if "pytest" in b)
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert ci[-1] == test_cmd
    assert test_cmd.startswith("python3 -m venv .venv && . .venv/bin/activate && ")
