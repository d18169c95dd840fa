"""Cerebras-facing modules: sparse LoRA inside ModelZoo's `cszoo fit`. Nothing here is imported eagerly.

- `autoregister`: the cheap import-time trigger (stdlib only) that runs `registration` steps when
  ModelZoo's own modules load; installed by `import modelzoo_ext`.
- `registration`: model names, trainer classes and converter entries given to ModelZoo.
- `config`, `model`: the `sparse_lora_llama` / `sparse_lora_mistral` config and model classes.
- `masks`: a mask file seen in ModelZoo naming (HF files converted with the q/k row permutation).
- `sparsity`: `MaskFileSparsity`, the cerebras.pytorch sparsity algorithm fed by the mask file.
- `callbacks`: `SparseLoRAMasks` (applies it, model only) and `SparseLoRALossLog`.
- `hook`, `wrapper`, `cli`: `sparse-lora install-hook`, `cszoo-sparse-lora`, `sparse-lora modelzoo status`.
- `tiny_assets`: `make tiny-assets` for the tiny CPU configs in `model_configs/`.

See docs/modelzoo.md.
"""

# The per-step loss/time log `SparseLoRALossLog` writes in a run's model_dir (stdlib-only home, so
# `sparse-lora parity` and the sweep read it without importing cerebras-pytorch).
LOSS_LOG_NAME = "sparse_lora_losses.jsonl"
