"""Sparse-LoRA layers and kernels shared by the ModelZoo model variants and the GPU reference."""
