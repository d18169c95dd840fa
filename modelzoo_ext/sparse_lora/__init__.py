"""Sparse-LoRA layers and kernels shared by the ModelZoo model variants and the GPU reference.

Pure PyTorch (no `cerebras` import). One definition of the math, in `kernels.py`:
- sparse_to_dense:  y = x (W*M)^T + s * dropout(x) A^T B^T
- sparse_to_sparse: y = x ((W + s*B@A) * M)^T
"""

from modelzoo_ext.run_config.sparse_lora_block import DEFAULT_TARGET_MODULES, SparseLoRAConfig
from modelzoo_ext.sparse_lora.apply import (
    LayerInfo,
    MergeReport,
    SparseLoRASummary,
    apply_sparse_lora_,
    find_target_linears,
    layer_generator,
    load_lora_state_dict_,
    lora_state_dict,
    merge_sparse_lora_,
    sparse_lora_layers,
    sparse_lora_modules,
)
from modelzoo_ext.sparse_lora.check import SparsityReport, TensorCheck, check_sparsity, check_tensor
from modelzoo_ext.sparse_lora.experts import SparseLoRAExperts, reference_sparse_matmul
from modelzoo_ext.sparse_lora.kernels import (
    MODES,
    SPARSE_TO_DENSE,
    SPARSE_TO_SPARSE,
    SampledPattern,
    effective_weight,
    merged_weight,
    sparse_lora_linear,
)
from modelzoo_ext.sparse_lora.layer import SparseLoRALinear
from modelzoo_ext.sparse_lora.peft_export import save_adapter

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "MODES",
    "SPARSE_TO_DENSE",
    "SPARSE_TO_SPARSE",
    "LayerInfo",
    "MergeReport",
    "SampledPattern",
    "SparseLoRAConfig",
    "SparseLoRAExperts",
    "SparseLoRALinear",
    "SparseLoRASummary",
    "SparsityReport",
    "TensorCheck",
    "apply_sparse_lora_",
    "check_sparsity",
    "check_tensor",
    "effective_weight",
    "find_target_linears",
    "layer_generator",
    "load_lora_state_dict_",
    "lora_state_dict",
    "merge_sparse_lora_",
    "merged_weight",
    "save_adapter",
    "reference_sparse_matmul",
    "sparse_lora_layers",
    "sparse_lora_modules",
    "sparse_lora_linear",
]
