"""The fine-tuning data layer both backends share (no `cerebras` import).

- `templates`: versioned prompt templates for BoolQ, HellaSwag and GSM8K (lm-eval's prompts).
- `split`: the deterministic train / held-out split by sha256 of an example key.
- `encode`: prompt/completion text -> one (3, msl) sample, as ModelZoo's finetuning mode builds it.
- `hdf5`: the HDF5 layout ModelZoo's `GptHDF5MapDataProcessor` reads (write and read).
- `prepare`: `sparse-lora data prepare`, JSONL or a task -> an HDF5 directory.
"""
