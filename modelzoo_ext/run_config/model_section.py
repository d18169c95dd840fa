"""The run config's `model:` section as ModelZoo reads it: one normalised record for every reader.

ModelZoo builds its model config from the `model:` section with pydantic: a field may be spelled
by its alias or by its field name (`moe` or `moe_params`: `populate_by_name`), a key left out takes
the field's default, and `post_init` fills some from others (`rotary_dim`, the dropout rates).
`normalise_model_section` does the same once, without importing ModelZoo, and returns a
`NormalisedModelSection`:
- `stated`: the keys the section sets, each under its YAML name (the alias where ModelZoo has
  one), so a key means the same however it is spelled; both spellings at once are refused, as
  ModelZoo refuses them;
- `values`: every key with ModelZoo's default where the section leaves it out, `post_init`'s
  fills, and one way of writing values that mean the same (`attention_inner_dim: null` = the
  hidden size, `pos_scaling_type` lower case, ...); the `moe` block is complete too;
- the attention and expert layout derived from them once: heads, key/value heads, head size,
  rotary size, experts, top-k, load-balancing coefficient.

Its readers: the architecture check and the HF <-> CS config map (`run_config.architecture`),
the name map's `RopeLayout`, the reference trainer (`RunConfig.model_section`, its router loss),
the ModelZoo model variants (`model.model_section`) and the merged export's tied embeddings.

ModelZoo's names and defaults come from one table module (`run_config.modelzoo_fields`, ModelZoo
2.10's, tested against the installed classes).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from modelzoo_ext.errors import UserError
from modelzoo_ext.run_config.modelzoo_fields import (
    MODELZOO_ALIASES,
    MODELZOO_DEFAULTS,
    MODELZOO_ONLY_DEFAULTS,
    MOE_DEFAULTS,
)

_DROPOUT_FILLED_FROM_DROPOUT_RATE = ("embedding_dropout_rate", "attention_dropout_rate")


def canonical_value(key: str, value: Any, values: Mapping[str, Any]) -> Any:
    """`value` of `key` written the one way the record keeps, given the section's other `values`:
    ModelZoo's `post_init` fills (None rotary size, None dropout rates) and spellings of one value."""
    if key == "attention_inner_dim" and value is None:
        return values.get("hidden_size")
    if key == "rotary_dim" and value is None and values.get("position_embedding_type") == "rotary":
        heads, hidden = values.get("num_heads"), values.get("hidden_size")
        return int(hidden // heads * 0.25) if heads and hidden else None  # ModelZoo's post_init
    if key in _DROPOUT_FILLED_FROM_DROPOUT_RATE and value is None:
        return values.get("dropout_rate")  # ModelZoo's post_init
    if key == "pos_scaling_type" and isinstance(value, str):
        return value.lower()  # ModelZoo accepts "YaRN"
    if key == "scale_qk_dot_by_d":
        return bool(value)
    if key == "extra_attention_params":
        return dict(value or {})
    return value


@dataclass(frozen=True)
class NormalisedModelSection:
    """A `model:` section as ModelZoo reads it (see the module docstring); build it with
    `normalise_model_section`."""

    stated: dict[str, Any]
    values: dict[str, Any]
    spellings: dict[str, str]  # YAML name -> the other name the section wrote it under, where it did

    def spelled_as(self, key: str) -> str:
        """The name the section wrote `key` under (for messages that point at the user's line)."""
        return self.spellings.get(key, key)

    @property
    def moe(self) -> dict[str, Any]:
        """The complete `moe` block (ModelZoo's defaults for the keys the section leaves out)."""
        return self.values["moe"]

    @property
    def num_heads(self) -> int:
        return int(self.values["num_heads"])

    @property
    def num_kv_heads(self) -> int:
        """Key/value heads: ModelZoo's `num_kv_groups` (default 1) under multi-query attention."""
        if self.values["attention_module"] != "multiquery_attention":
            return self.num_heads
        return int(self.values["extra_attention_params"].get("num_kv_groups", 1))

    @property
    def head_dim(self) -> int:
        return int(self.values["attention_inner_dim"]) // self.num_heads

    @property
    def rotary_dim(self) -> int | None:
        """Channels of each head that rotary embeddings rotate (None without rotary embeddings)."""
        rotary = self.values["rotary_dim"]
        return None if rotary is None else int(rotary)

    @property
    def num_experts(self) -> int:
        """Experts per MoE layer (0: a dense model)."""
        return int(self.moe["num_experts"] or 0)

    @property
    def top_k(self) -> int:
        return int(self.moe["top_k"])

    @property
    def load_balancing_loss_coef(self) -> float:
        return float(self.moe["load_balancing_loss_coef"])


def _stated_keys(section: Mapping[str, Any], where: str) -> tuple[dict[str, Any], dict[str, str]]:
    """(the section's keys under their YAML names, YAML name -> the name written where it differs);
    a key spelled both ways is refused."""
    stated: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for key, value in section.items():
        name = MODELZOO_ALIASES.get(key, key)
        if name in stated:
            raise UserError(
                f"`{spelled[name]}` and `{key}` are one ModelZoo setting, set twice (ModelZoo refuses both too)",
                where=where,
                fix=f"keep one of them (this package writes `{name}`)",
            )
        stated[name], spelled[name] = value, key
    if "moe" in stated:  # pydantic's dump of a built config holds MoEConfig's fields as a dict
        stated["moe"] = dict(stated["moe"] or {})
    return stated, {name: key for name, key in spelled.items() if name != key}


def normalise_model_section(
    section: Mapping[str, Any], *, where: str = "trainer.init.model"
) -> NormalisedModelSection:
    """The record of a `model:` section (a YAML mapping, or the `model_dump()` of a ModelZoo model
    config): aliases applied, ModelZoo's defaults and `post_init` fills added, values canonical.

    Keys outside ModelZoo's tables are kept as they are (the architecture check decides about
    them). UserError when a key is set under both of its names.
    """
    stated, spellings = _stated_keys(section, where)
    merged = {**MODELZOO_DEFAULTS, **MODELZOO_ONLY_DEFAULTS, **stated}
    values = {key: canonical_value(key, value, merged) for key, value in merged.items()}
    values["moe"] = {**MOE_DEFAULTS, **stated.get("moe", {})}
    return NormalisedModelSection(stated=stated, values=values, spellings=spellings)


def as_normalised(section: Mapping[str, Any] | NormalisedModelSection) -> NormalisedModelSection:
    """`section` itself when already normalised, else `normalise_model_section(section)`."""
    if isinstance(section, NormalisedModelSection):
        return section
    return normalise_model_section(section)
