"""modelzoo-sparse-lora: sparse-to-dense and sparse-to-sparse LoRA for pruned LLMs.

The package is layered (docs/layers.md; `make test` enforces it with import-linter):
1. the pure-PyTorch core (masks and the mask file, sparse-LoRA kernels, data, the HF <-> CS name
   map, the run config, the loss log): never imports `cerebras`, nor anything above it;
2. three faces on the core, none importing another: `modelzoo_ext.cerebras` (what ModelZoo sees;
   imports ModelZoo and cerebras-pytorch lazily), `mask_converters`, `gpu_reference`;
3. `modelzoo_ext.study`: evaluation, sweeps, the registry, the report and the demo;
4. `modelzoo_ext.cli`: the `sparse-lora` command.
"""

__version__ = "0.1.0"
