"""The Triton kernels on CPU: Triton's interpreter runs them on CPU tensors (numpy underneath).

TRITON_INTERPRET must be set before ragtop.gpu.kernels is imported (the @triton.jit
decorator reads it), so this conftest sets it at collection time when there is no CUDA
device. Every module here skips with a reason when triton is not installed.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
