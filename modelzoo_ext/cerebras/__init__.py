"""The ModelZoo face: sparse LoRA inside ModelZoo's own, unmodified `cszoo fit`.

- `autoregister`: the cheap import-time trigger (stdlib only) that runs `registration` steps when
  ModelZoo's own modules load. Importing this package installs it: the `.pth` file of
  `sparse-lora install-hook` and the `cszoo-sparse-lora` wrapper both do.
- `registration`: model names, trainer classes and converter entries given to ModelZoo.
- `config`, `model`: the `sparse_lora_<family>` config and model classes, one per family of
  `modelzoo_ext.families`.
- `sparsity`: `MaskFileSparsity`, the cerebras.pytorch sparsity algorithm fed by the mask file.
- `callbacks`: `SparseLoRAMasks` (checks provenance, applies the masks to the model only) and
  `SparseLoRALossLog`.
- `converters`: entries for ModelZoo's checkpoint-converter registry (`cszoo checkpoint convert`).
- `hook`, `wrapper`, `cli`: `sparse-lora install-hook`, `cszoo-sparse-lora`, `sparse-lora modelzoo status`.

Only `autoregister` is imported eagerly. See docs/modelzoo.md.
"""

from modelzoo_ext.cerebras import autoregister as _autoregister

_autoregister.install()
