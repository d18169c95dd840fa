"""HF <-> Cerebras conversion of weights, masks and LoRA adapters; PEFT and merged-sparse exports."""
