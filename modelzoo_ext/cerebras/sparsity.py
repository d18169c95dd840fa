"""`MaskFileSparsity`: a cerebras.pytorch sparsity algorithm whose masks come from a mask file.

Static sparsity (masks never change), but each parameter's mask is the precomputed one from the
mask file instead of `random`/`topk`, and only the parameters the file names are sparsified
(never `lora_A`/`lora_B`, norms or embeddings). Through cstorch each mask becomes a persistent
`<param>_mask` buffer (saved in every checkpoint), the weight is multiplied by it in place before
every forward, and on CSX the weight is annotated with its exact sparsity for the compiler.

Lifecycle (llm-compressor style):
    algorithm = MaskFileSparsity(model.masks)     # the model's view of the mask file (CS naming)
    algorithm.apply(model)        # model only: frozen weights have no optimizer state to prune
    algorithm.check_covers(weight_names)          # every mask used, every LoRA weight masked
    ... cstorch initialises each mask lazily at run start (after a checkpoint load; masks already
        in the loaded checkpoint win) by calling the per-parameter init below.

Do not name this class in a YAML `sparsity:` section: that also applies it to the optimizer,
which fails at the first step when the base weights are frozen. The `SparseLoRAMasks` callback
applies it to the model only.

Imports cerebras-pytorch (not ModelZoo).
"""

from __future__ import annotations

from typing import Any

import torch
from cerebras.pytorch.sparse import Static
from cerebras.pytorch.sparse.base import SparseParameter
from cerebras.pytorch.sparse.utils import make_hyperparam_schedule

from modelzoo_ext.errors import UserError
from modelzoo_ext.masks.view import MaskView


class MaskFileSparsity(Static):
    """Static sparsity with per-parameter masks loaded from a sparse-lora mask file.

    Args:
        masks: the mask file seen in the model's CS naming (`MaskView`, the one the model read its
            masks through). Annotated `Any`: ModelZoo builds a pydantic schema from every
            SparsityAlgorithm's arguments, and a YAML `sparsity:` section cannot (and must not)
            name this class.
        kwargs: passed to `Static` (cstorch builds algorithms with extra keywords).
    """

    def __init__(self, masks: Any, **kwargs: Any):
        if not isinstance(masks, MaskView) or masks.naming != "cs":
            raise UserError(
                "MaskFileSparsity is applied by the SparseLoRAMasks callback, not from a `sparsity:` section",
                where="trainer.init.sparsity",
                fix="remove the sparsity section and add `- SparseLoRAMasks: {}` to trainer.init.callbacks",
            )
        kwargs.pop("sparsity", None)  # the sparsity of each parameter is its mask's, not a knob
        super().__init__(sparsity=None, **kwargs)
        self.source = masks
        self._unused = set(masks.keys())

    def sparsify_parameter(self, module: torch.nn.Module, name: str, param: torch.Tensor) -> None:
        """Sparsify `param` (full name `name` in the model) iff the mask file has its mask."""
        if param is None or name not in self._unused or self.get_sparse_params(param):
            return
        self._unused.discard(name)
        # Per-parameter constant schedule: the exact level is the CSX compiler's sparsity hint.
        self.sparsity[param] = make_hyperparam_schedule(1.0 - self.source.density(name))
        shape = tuple(param.shape)

        def init_from_file(p: torch.Tensor, sparsity=None, device=None, **_: Any) -> torch.Tensor:
            mask = self.source.get(name)
            if tuple(mask.shape) != shape:
                raise UserError(
                    f"mask {name!r} has shape {tuple(mask.shape)}, the weight {shape}",
                    where=str(self.source.path),
                    fix="use masks computed for this model",
                )
            return mask.to(device or p.device)

        sparse_param = SparseParameter(module, name, init_from_file)
        param._sparse_param = sparse_param
        self.sparse_params[name] = sparse_param

    def check_covers(self, weight_names: list[str]) -> None:
        """After `apply`: every mask was used, and exactly the `weight_names` were sparsified."""
        sparsified = set(self.sparse_params.keys())
        problems = []
        if self._unused:
            problems.append(f"masks that match no parameter of the model: {sorted(self._unused)}")
        missing = sorted(set(weight_names) - sparsified)
        if missing:
            problems.append(f"targeted weights without a mask: {missing}")
        extra = sorted(sparsified - set(weight_names))
        if extra:
            problems.append(f"masked parameters that carry no sparse LoRA: {extra}")
        if problems:
            raise UserError(
                "; ".join(problems),
                where=str(self.source.path),
                fix="use a mask file computed for this model and exactly the sparse_lora.target_modules",
            )
