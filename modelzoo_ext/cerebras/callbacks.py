"""Trainer callbacks of the sparse-LoRA runs: apply the masks, record the losses.

Both are named in a run YAML under `trainer.init.callbacks`:

    callbacks:
    - SparseLoRAMasks: {}                 # required by the sparse_lora_<family> models
    - SparseLoRALossLog: {}               # optional: <model_dir>/sparse_lora_losses.jsonl

ModelZoo's validation finds callbacks by lower-cased class name among the subclasses imported
before it runs; `modelzoo_ext.cerebras.registration` imports this module for that.
Importing this module imports ModelZoo's trainer and cerebras-pytorch, not ModelZoo's models:
it runs right after `cerebras.modelzoo.trainer` loads, which may be in the middle of importing a
model module (the model module is imported inside `setup`).
"""

from __future__ import annotations

import time
from pathlib import Path

import cerebras.pytorch as cstorch
import torch
from cerebras.modelzoo.trainer.callbacks import Callback

from modelzoo_ext.cerebras.sparsity import MaskFileSparsity
from modelzoo_ext.errors import UserError
from modelzoo_ext.loss_log import LossRow, append_row, loss_log_path
from modelzoo_ext.run_config.migrate import lora_callback_refusal
from modelzoo_ext.sparse_lora import sparse_lora_modules


class SparseLoRAMasks(Callback):
    """Make the mask file's masks cstorch sparse parameters of the model (model only, at setup).

    At `pre_setup` (trainer construction, before the model is built) it refuses ModelZoo's own
    `Lora` callback (`modelzoo_ext.run_config.migrate.lora_callback_refusal`); at `setup` it also
    refuses ModelZoo LoRA layers found in the built model.
    At `setup` (after the model is built, before any compile or appliance job) it applies a
    `MaskFileSparsity` to the model, checks that it masks exactly the sparse-LoRA weights and
    uses every mask in the file (a UserError lists the offending names otherwise), then lets the
    model run. Before the base checkpoint is loaded it checks that the checkpoint belongs to the
    mask file (its converted source or pruned output; `modelzoo_ext.masks.provenance`). Applying it to the model only is deliberate: the YAML `sparsity:` section would
    also apply it to the optimizer, which fails at the first step when the weights are frozen.
    """

    def __init__(self):
        self.sparsity: MaskFileSparsity | None = None
        self._base_checked = False  # a later load of None keeps the weights already there

    def pre_setup(self, trainer):
        """Refuse ModelZoo's own `Lora` callback (any spelling; a legacy `model.lora_params` becomes
        it) before the model is built: it would add a second, dense adapter next to ours."""
        from cerebras.modelzoo.trainer.callbacks import Lora

        if trainer.get_callback(Lora) is not None:
            raise lora_callback_refusal("trainer.init.callbacks")

    def setup(self, trainer):
        from cerebras.modelzoo.common.utils.model.lora import LoRALayer

        from modelzoo_ext.cerebras.model import SparseLoRAMixin

        model = trainer.model
        foreign = [name for name, module in model.named_modules() if isinstance(module, LoRALayer)]
        if foreign:  # however it got there: ModelZoo's LoRA layers next to ours
            raise lora_callback_refusal(f"the model ({len(foreign)} ModelZoo LoRA layers, e.g. {foreign[0]})")
        if not isinstance(model, SparseLoRAMixin):
            raise UserError(
                f"SparseLoRAMasks needs a sparse_lora_<family> model (e.g. sparse_lora_llama), got {type(model).__name__}",
                where="trainer.init.model.name",
                fix="use a model_configs/params_sparse_lora_*.yaml as the template",
            )
        config = model.sparse_lora_config
        if config.dense_baseline:
            return  # plain LoRA: nothing to mask
        self.sparsity = MaskFileSparsity(model.masks)
        self.sparsity.apply(model)
        weights = [f"{name}.{layer.weight_name}" for name, layer in sparse_lora_modules(model).items()]
        self.sparsity.check_covers(weights)
        model.mark_masks_applied()
        trainer.logger.info(
            f"SparseLoRAMasks: {len(weights)} weights masked from {config.mask_path} "
            f"({config.mode}); {model.sparse_lora_summary.trainable_params:,} trainable parameters"
        )

    def on_before_load_checkpoint(self, trainer, ckpt_path):
        """The base checkpoint must belong to the mask file (`modelzoo_ext.masks.provenance`).

        Runs before ModelZoo reads the checkpoint: a checkpoint that embeds other masks would
        otherwise win silently (cstorch keeps masks found in a loaded checkpoint).
        """
        from modelzoo_ext.masks.provenance import OVERRIDE_KEY, check_cs_checkpoint

        model = trainer.model
        config = model.sparse_lora_config
        if config.dense_baseline:
            return
        if ckpt_path is None:
            if self._base_checked or config.skip_provenance_check:
                return
            raise UserError(
                "no base checkpoint: the frozen base weights would be ModelZoo's random initialisation",
                where="trainer.fit.ckpt_path",
                fix=f"set fit.ckpt_path to the base from `sparse-lora convert hf-to-cs` (or {OVERRIDE_KEY}: true)",
            )
        verdict = check_cs_checkpoint(
            model.masks.source, ckpt_path, run_dir=trainer.model_dir, skip=config.skip_provenance_check
        )
        self._base_checked = True
        trainer.logger.info(f"SparseLoRAMasks: {ckpt_path} accepted for {config.mask_path}: {verdict}")

    def on_save_trainer_state(self, trainer, state_dict):
        pass  # the masks live in the model state (`<param>_mask`); nothing else to save

    def on_load_trainer_state(self, trainer, state_dict):
        pass


class SparseLoRALossLog(Callback):
    """Append every training step's loss, at full precision, to `<model_dir>/sparse_lora_losses.jsonl`.

    The format is `modelzoo_ext.loss_log`'s: one row per step with the loss and the host time
    since the previous row (the step time the sweep turns into tokens/s). `sparse-lora parity`
    compares the losses with gpu_reference's.
    """

    def __init__(self):
        self.path: Path | None = None
        self._last_time = 0.0

    def setup(self, trainer):
        self.path = loss_log_path(trainer.model_dir)
        self._last_time = time.perf_counter()

    def on_train_batch_end(self, trainer, model, outputs, batch, batch_idx):
        self._write(trainer.global_step, outputs["loss"])

    @cstorch.step_closure
    def _write(self, step: int, loss: torch.Tensor) -> None:
        now = time.perf_counter()
        append_row(self.path, LossRow(int(step), float(loss.item()), now - self._last_time))
        self._last_time = now

    def on_save_trainer_state(self, trainer, state_dict):
        pass

    def on_load_trainer_state(self, trainer, state_dict):
        pass
