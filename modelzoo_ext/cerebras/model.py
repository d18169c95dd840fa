"""The ModelZoo model variants `sparse_lora_llama` and `sparse_lora_mistral`.

Each builds ModelZoo's stock model, then puts the shared sparse-LoRA layers
(`modelzoo_ext.sparse_lora`) on the targeted linears by attribute name, e.g. `q_proj` ->
`...self_attn.proj_q_dense_layer`, and freezes every other parameter. The masks come from the
mask file (converted from HF naming on the fly); wrong masks fail here, at trainer setup,
before anything is compiled.

Who zeroes W off the mask: the `SparseLoRAMasks` callback applies a cerebras.pytorch sparsity
algorithm to this model, which masks W in place before every forward (and tells the CS compiler
the sparsity). The layers are therefore built with `mask_base_in_forward=False`; their own mask
is used only where the math needs it (the s2s masked update). Without that callback W would be
used unmasked, so `forward` refuses to run until the callback has applied the masks.

Lifecycle: `__init__` (build stock model -> read masks -> apply sparse LoRA, base frozen) ->
`SparseLoRAMasks.setup` (cstorch sparsity on the model, `mark_masks_applied`) -> training.
"""

from __future__ import annotations

from typing import Any

from cerebras.modelzoo.models.nlp.llama.model import LlamaModel
from cerebras.modelzoo.models.nlp.mistral.model import MistralModel

from mask_converters.rules import cs_to_hf_name, hf_module_to_cs_module
from modelzoo_ext.cerebras.config import SparseLoRALlamaModelConfig, SparseLoRAMistralModelConfig
from modelzoo_ext.cerebras.masks import read_cs_masks
from modelzoo_ext.errors import UserError
from modelzoo_ext.sparse_lora import SparseLoRAConfig, SparseLoRASummary, apply_sparse_lora_

CALLBACK_NAME = "SparseLoRAMasks"


class SparseLoRAMixin:
    """Shared by both variants: the sparse-LoRA setup after the stock model is built."""

    family: str
    sparse_lora_config: SparseLoRAConfig
    sparse_lora_summary: SparseLoRASummary
    model_section: dict[str, Any]
    masks_applied: bool

    def _attach_sparse_lora(self, config) -> None:
        self.family = config.family
        self.sparse_lora_config = config.sparse_lora
        self.model_section = config.model_dump()
        cfg = config.sparse_lora
        masks = {} if cfg.dense_baseline else read_cs_masks(cfg.mask_path, self.family, self.model_section)
        self.sparse_lora_summary = apply_sparse_lora_(
            self,
            cfg,
            masks,
            target_modules=[hf_module_to_cs_module(t, self.family) for t in cfg.target_modules],
            canonical_name=self.hf_module_name,
            mask_base_in_forward=False,  # the cstorch sparsity hook masks W in place before forward
            sampled_product="never",  # plain dense ops only: the model is traced on the CS backend
        )
        self.masks_applied = cfg.dense_baseline

    def hf_module_name(self, cs_module: str) -> str:
        """ModelZoo module name -> HF module name (seeds LoRA A identically on both backends)."""
        return cs_to_hf_name(f"{cs_module}.weight", self.family)[: -len(".weight")]

    def mark_masks_applied(self) -> None:
        """Called by the `SparseLoRAMasks` callback once cstorch sparsity masks the weights."""
        self.masks_applied = True

    def _require_masks_applied(self) -> None:
        if not self.masks_applied:
            raise UserError(
                f"model {self.family} with sparse_lora.mode={self.sparse_lora_config.mode} would train "
                "with unmasked base weights: the mask-applying callback is not in the run",
                where="trainer.init.callbacks",
                fix=f"add `- {CALLBACK_NAME}: {{}}` to trainer.init.callbacks (see model_configs/)",
            )


class SparseLoRALlamaModel(SparseLoRAMixin, LlamaModel):
    """ModelZoo's Llama with sparse LoRA on the targeted linears (registry name `sparse_lora_llama`)."""

    def __init__(self, config: SparseLoRALlamaModelConfig):
        if isinstance(config, dict):
            config = SparseLoRALlamaModelConfig(**config)
        super().__init__(config)
        self._attach_sparse_lora(config)

    def forward(self, *args, **kwargs):
        self._require_masks_applied()
        return super().forward(*args, **kwargs)


class SparseLoRAMistralModel(SparseLoRAMixin, MistralModel):
    """ModelZoo's Mistral with sparse LoRA on the targeted linears (registry name `sparse_lora_mistral`)."""

    def __init__(self, config: SparseLoRAMistralModelConfig):
        if isinstance(config, dict):
            config = SparseLoRAMistralModelConfig(**config)
        super().__init__(config)
        self._attach_sparse_lora(config)

    def forward(self, *args, **kwargs):
        self._require_masks_applied()
        return super().forward(*args, **kwargs)
