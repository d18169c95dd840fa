"""modelzoo-sparse-lora: sparse-to-dense and sparse-to-sparse LoRA for pruned LLMs.

The pure-PyTorch core (masks, mask file format, sparse-LoRA layers and kernels) lives here and
imports nothing from `cerebras`; the Cerebras-facing modules are in `modelzoo_ext.cerebras` and
import ModelZoo and cerebras-pytorch lazily.
"""

__version__ = "0.1.0"
