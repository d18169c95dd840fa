"""The ModelZoo model variants `sparse_lora_<family>` (`sparse_lora_llama`, `sparse_lora_mistral`, ...).

Each builds ModelZoo's stock model of its family, then puts the shared sparse-LoRA layers
(`modelzoo_ext.sparse_lora`) on the targeted linears by attribute name, e.g. `q_proj` ->
`...self_attn.proj_q_dense_layer`, and freezes every other parameter. The masks come from the
mask file, read through the one mask view (`modelzoo_ext.masks.view.MaskView`, converted from HF
naming on the fly); the model keeps that view (`model.masks`) for the `SparseLoRAMasks`
callback, so the file is opened and checked once per run. Wrong masks fail here, at trainer
setup, before anything is compiled.

Who zeroes W off the mask: the `SparseLoRAMasks` callback applies a cerebras.pytorch sparsity
algorithm to this model, which masks W in place before every forward (and tells the CS compiler
the sparsity). The layers are therefore built with `mask_base_in_forward=False`; their own mask
is used only where the math needs it (the s2s masked update). Without that callback W would be
used unmasked, so `forward` refuses to run until the callback has applied the masks.

Lifecycle: `__init__` (build stock model -> read masks -> apply sparse LoRA, base frozen) ->
`SparseLoRAMasks.setup` (provenance check, cstorch sparsity on the model, `mark_masks_applied`)
-> training.

Mixtral (`sparse_lora_mixtral`): ModelZoo's `MixtralModel` with fused experts
(`moe_implementation: optimized`, enforced by the config); each fused expert projection
(`...fused_ffns.{0,1}.linear_layer[_for_glu]`, HF w3/w1/w2) becomes a `SparseLoRAExperts` with
LoRA factors stacked on dim 1 like the weight, computed with cerebras-pytorch's `sparse_matmul`
(the CSX top-k kernel). The router is never a target and its load-balancing loss is ModelZoo's own
(`moe.load_balancing_loss_coef`): nothing here changes the MoE block's routing or loss.

One model class per family is generated from the family table (ModelZoo's registry rejects two
names with one class path): `SparseLoRALlamaModel`, `SparseLoRAMistralModel`, `SparseLoRAMixtralModel`.
"""

# No `from __future__ import annotations`: ModelZoo builds each model's config schema from the
# `config` annotation of its `__init__`, which must be the class object itself.
import importlib
from pathlib import Path

from modelzoo_ext.cerebras.config import CONFIG_CLASSES
from modelzoo_ext.errors import UserError
from modelzoo_ext.families import FAMILIES, ModelFamily
from modelzoo_ext.masks.view import MaskView
from modelzoo_ext.name_map import RopeLayout, cs_to_hf_name, cs_to_hf_names, hf_module_to_cs_module, is_fused
from modelzoo_ext.run_config.model_section import NormalisedModelSection, normalise_model_section
from modelzoo_ext.run_config.sparse_lora_block import SparseLoRAConfig
from modelzoo_ext.sparse_lora import SparseLoRASummary, apply_sparse_lora_

CALLBACK_NAME = "SparseLoRAMasks"


class SparseLoRAMixin:
    """Shared by every variant: the sparse-LoRA setup after the stock model is built."""

    family: str
    sparse_lora_config: SparseLoRAConfig
    sparse_lora_summary: SparseLoRASummary
    model_section: NormalisedModelSection
    masks: MaskView | None
    masks_applied: bool

    def _attach_sparse_lora(self, config) -> None:
        self.family = config.family
        self.sparse_lora_config = cfg = config.sparse_lora
        self.model_section = normalise_model_section(config.model_dump())
        self.masks = None if cfg.dense_baseline else self._open_masks(cfg.mask_path)
        self.sparse_lora_summary = apply_sparse_lora_(
            self,
            cfg,
            {} if self.masks is None else self.masks.as_dict(),
            target_modules=[hf_module_to_cs_module(t, self.family) for t in cfg.target_modules],
            canonical_name=self.hf_module_name,
            mask_base_in_forward=False,  # the cstorch sparsity hook masks W in place before forward
            sampled_product="never",  # plain dense ops only: the model is traced on the CS backend
            sparse_matmul=cs_sparse_matmul,  # fused experts: ModelZoo's top-k expert kernel
        )
        self.masks_applied = cfg.dense_baseline

    def _open_masks(self, mask_path: str) -> MaskView:
        """The run's mask file in this model's (CS, `model.`-prefixed) naming."""
        if not Path(mask_path).is_file():
            raise UserError(
                "sparse_lora.mask_path does not exist",
                where=str(mask_path),
                fix="run `sparse-lora masks compute` (or `make tiny-assets` for the tiny config), or fix "
                "the path (relative paths are taken from the directory cszoo runs in)",
            )
        return MaskView(mask_path, "cs", self.family, RopeLayout.from_model_section(self.model_section))

    def hf_module_name(self, cs_module: str) -> str | list[str]:
        """ModelZoo module name -> HF module name (seeds LoRA A identically on both backends); for a
        fused expert module, the E per-expert HF module names."""
        if not is_fused(f"{cs_module}.weight", self.family):
            return cs_to_hf_name(f"{cs_module}.weight", self.family)[: -len(".weight")]
        experts = self.model_section.num_experts
        names = cs_to_hf_names(f"{cs_module}.expert_weights", self.family, experts)
        return [name[: -len(".weight")] for name in names]

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


def cs_sparse_matmul(input_values, input_indices, weight):
    """cerebras-pytorch's top-k expert matmul (the CSX kernel on the wafer), operands in the run's
    half dtype as ModelZoo's `TopKExpertsSparseLinear` casts them."""
    import cerebras.pytorch.nn.functional as F
    from cerebras.modelzoo.common.half_dtype import maybe_to_half_dtype

    return F.sparse_matmul(maybe_to_half_dtype(input_values), input_indices, maybe_to_half_dtype(weight))


def stock_model_class(family: ModelFamily) -> type:
    """ModelZoo's own model class of `family` (e.g. `LlamaModel`)."""
    return getattr(importlib.import_module(family.modelzoo_module), family.modelzoo_class)


def _model_class(family: ModelFamily) -> type:
    config_class = CONFIG_CLASSES[family.name]

    def __init__(self, config: config_class):
        if isinstance(config, dict):
            config = config_class(**config)
        super(cls, self).__init__(config)
        self._attach_sparse_lora(config)

    def forward(self, *args, **kwargs):
        self._require_masks_applied()
        return super(cls, self).forward(*args, **kwargs)

    name = f"SparseLoRA{family.class_stem}Model"
    cls = type(
        name,
        (SparseLoRAMixin, stock_model_class(family)),
        {
            "__init__": __init__,
            "forward": forward,
            "__module__": __name__,
            "__qualname__": name,
            "__doc__": f"ModelZoo's {family.modelzoo_class} with sparse LoRA on the targeted linears "
            f"(registry name `{family.sparse_lora_model}`).",
        },
    )
    return cls


MODEL_CLASSES: dict[str, type] = {name: _model_class(family) for name, family in FAMILIES.items()}
globals().update(
    {cls.__name__: cls for cls in MODEL_CLASSES.values()}
)  # importable by name (registry, pickle)
