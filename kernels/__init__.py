"""Triton kernels of convcov_fast, installed as ``convcov_fast.kernels``.

Each module contains its kernels and the host functions that launch them. The modules import only
torch and triton, and they assume their inputs were validated by the caller.
"""
