"""Run Triton kernels through the interpreter when there is no GPU (must precede `import triton`)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
