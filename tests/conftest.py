"""Shared test set-up.

The Triton interpreter must be chosen before triton is first imported, so this runs at collection
time. On a machine without CUDA every Triton kernel then runs on the CPU under the interpreter.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
