"""The run config both backends read (`params_sparse_lora*.yaml`): one definition of each part.

- `modes`: the fine-tuning modes, their short names (s2s, s2d, lora) and the export rule.
- `sparse_lora_block`: the `sparse_lora:` block (`SparseLoRAConfig`), validated by both backends.
- `modelzoo_fields`: ModelZoo's model config fields as tables (second names, defaults, which
  keys the architecture check compares and why not the others).
- `model_section`: the `model:` section as ModelZoo reads it (`NormalisedModelSection`: either
  spelling of a key, ModelZoo's defaults), the one record every reader of the section uses.
- `architecture`: HF `config.json` <-> the ModelZoo `model:` section, and the check that a run
  config describes a given HF model.
- `params`: the whole YAML (trainer layout) as the reference trainer reads it, and what it ignores
  on purpose.
- `trainer_yaml`: the YAML as a raw mapping: load, write, and read or change one setting where it
  lives (for code that derives one run's params file from another).
"""

from modelzoo_ext.run_config.architecture import (
    ArchitectureCheck,
    check_architecture,
    cs_to_hf_config,
    hf_rope,
    hf_to_cs_model_config,
)
from modelzoo_ext.run_config.model_section import (
    NormalisedModelSection,
    normalise_model_section,
)
from modelzoo_ext.run_config.modes import (
    DENSE_LORA,
    MODES,
    SPARSE_TO_DENSE,
    SPARSE_TO_SPARSE,
    export_kind,
    short_name,
    yaml_mode,
)
from modelzoo_ext.run_config.params import RunConfig, load_run_config
from modelzoo_ext.run_config.sparse_lora_block import DEFAULT_TARGET_MODULES, SparseLoRAConfig
from modelzoo_ext.run_config.trainer_yaml import (
    find_model_section,
    load_yaml,
    trainer_yaml_model_section,
    write_yaml,
)

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "DENSE_LORA",
    "MODES",
    "NormalisedModelSection",
    "SPARSE_TO_DENSE",
    "SPARSE_TO_SPARSE",
    "ArchitectureCheck",
    "RunConfig",
    "SparseLoRAConfig",
    "check_architecture",
    "cs_to_hf_config",
    "export_kind",
    "find_model_section",
    "hf_rope",
    "hf_to_cs_model_config",
    "load_run_config",
    "load_yaml",
    "normalise_model_section",
    "short_name",
    "trainer_yaml_model_section",
    "write_yaml",
    "yaml_mode",
]
