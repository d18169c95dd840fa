"""Cerebras-facing modules: ModelZoo registration, model variants, sparsity hook. Imports ModelZoo lazily."""
