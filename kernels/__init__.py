"""Fused kernels for PaLM: Triton on NVIDIA GPUs, plain PyTorch everywhere else."""
