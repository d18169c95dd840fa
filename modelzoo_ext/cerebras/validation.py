"""A run config validated by the installed ModelZoo, as `cszoo fit` validates it before it runs.

    problems = modelzoo_validation_problems(params)     # [] when ModelZoo accepts the config

`cszoo fit` (and `cszoo config validate`) read the YAML, turn legacy params into trainer params,
and call `cerebras.modelzoo.trainer.validate.validate_trainer_params`, ModelZoo's pydantic
classes: the optimizer, scheduler, sparsity and callback unions, then the model's config class
from the registry, then the data processors (which check that `data_dir` exists). This does the
same, with this package's model variants and callbacks registered first, and returns each
problem as `location: message` instead of raising (ModelZoo's own warning with the whole
config printed is silenced). Importing ModelZoo takes several seconds; it happens on the first call.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

# Parts of a pydantic error location that name the validator, not the setting.
_VALIDATOR_PART = re.compile(r"^(function-|list\[|tagged-union|union\[|json-or-python|lax-or-strict)")


def _location(loc: tuple[Any, ...]) -> str:
    """`0.fit.train_dataloader.GptHDF5MapDataProcessor.config.data_dir.function-before[...]` ->
    `fit.train_dataloader.GptHDF5MapDataProcessor.config.data_dir` (the trainer index and
    pydantic's validator names dropped)."""
    parts = [str(p) for p in loc]
    if parts and parts[0].isdigit():
        parts = parts[1:]
    return ".".join(p for p in parts if not _VALIDATOR_PART.match(p))


def modelzoo_validation_problems(params: dict[str, Any]) -> list[str]:
    """ModelZoo's validation of a trainer YAML (as a mapping); each problem once, `where: what`."""
    from pydantic import ValidationError

    from modelzoo_ext.cerebras.registration import register_all

    register_all()
    from cerebras.modelzoo.trainer.utils import convert_legacy_params_to_trainer_params, is_legacy_params
    from cerebras.modelzoo.trainer.validate import validate_trainer_params

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ModelZoo warns with the whole config on failure
        try:
            if is_legacy_params(params):
                params = convert_legacy_params_to_trainer_params(params)
            validate_trainer_params(params)
        except ValidationError as exc:
            problems: dict[str, str] = {}
            for error in exc.errors():
                problems.setdefault(_location(error["loc"]), error["msg"])
            return [f"{where}: {what}" for where, what in problems.items()]
        except (KeyError, TypeError, ValueError) as exc:
            return [f"{type(exc).__name__}: {exc}"]
    return []
