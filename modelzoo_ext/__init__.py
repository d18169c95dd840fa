"""modelzoo-sparse-lora: sparse-to-dense and sparse-to-sparse LoRA for pruned LLMs.

The pure-PyTorch core (masks, mask file format, sparse-LoRA layers and kernels) lives here and
imports nothing from `cerebras`; the Cerebras-facing modules are in `modelzoo_ext.cerebras` and
import ModelZoo and cerebras-pytorch lazily.
"""

__version__ = "0.1.0"

# ModelZoo registration (model names, callbacks, converters) runs only when ModelZoo itself is
# imported in this process; until then this costs one small finder on sys.meta_path.
from modelzoo_ext.cerebras import autoregister as _autoregister  # noqa: E402

_autoregister.install()
