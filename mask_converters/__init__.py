"""HF <-> Cerebras conversion of weights, masks and LoRA adapters; PEFT and merged-sparse exports."""

# Import order: `modelzoo_ext` registers with ModelZoo when it is imported after ModelZoo, and that
# registration imports `mask_converters.rules`. Initialising `modelzoo_ext` here, before any of
# our submodules starts executing, lets that nested import load `rules` completely instead of
# finding it half-initialised.
import modelzoo_ext  # noqa: F401
