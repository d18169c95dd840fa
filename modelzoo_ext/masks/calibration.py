"""Calibration statistics for the data-driven methods, gathered through transformers with hooks.

- wanda: for each targeted Linear, the L2 norm of each input channel over all calibration
  tokens (a forward pre-hook adds x_j^2; nothing of size [tokens, hidden] is kept).
- gradient / taylor: dL/dW of the language-modelling loss, accumulated over calibration batches
  (one sequence per backward, so activation memory stays that of one sequence).

Calibration data never comes from evaluated examples. It is, in order of preference:
- a directory prepared by `data prepare` (`--calibration-data`): the token ids of its samples
  (prompt and completion, up to each sample's last loss token), in an order shuffled by the seed;
  the sweep passes each task's training data, so the masks calibrate on that task's training split;
- a user text file (`--calibration-text`);
- by default, the passages of the BoolQ examples in the *training part* of the bundled BoolQ
  validation split (the offline protocol's default fraction and salt) that no held-out question
  uses, shuffled by the seed.
Source, token count, sequence length and seed are recorded in the mask file.

Limit: the model is loaded whole (in its checkpoint dtype) on `device`; the gradient methods also
hold one gradient per targeted weight. Magnitude and random never load the model, and
importing this module (for `CalibrationConfig`) imports neither torch nor transformers.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelzoo_ext.errors import UserError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class CalibrationConfig:
    """Where calibration text comes from and how much of it to use."""

    text_file: str | None = None
    data_dir: str | None = None
    tokens: int = 2048
    seq_len: int = 256
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.tokens < 1 or self.seq_len < 1:
            raise UserError(
                "calibration tokens and sequence length must be positive", where="--calibration-tokens"
            )
        if self.text_file and self.data_dir:
            raise UserError("give --calibration-text or --calibration-data, not both", where="calibration")


def _texts(config: CalibrationConfig) -> tuple[list[str], dict[str, Any]]:
    if config.text_file:
        path = Path(config.text_file)
        if not path.is_file():
            raise UserError("calibration text file not found", where=str(path), fix="check the path")
        data = path.read_bytes()
        source = {"source": "file", "path": str(path.resolve()), "sha256": hashlib.sha256(data).hexdigest()}
        return [data.decode("utf-8", errors="replace")], source
    from modelzoo_ext.data.protocol import DataProtocol

    protocol = DataProtocol("offline", "bundled")
    # BoolQ asks several questions about one passage: drop passages any held-out question uses.
    evaluated = {row["passage"] for row in protocol.evaluated_rows("boolq")}
    passages = sorted({row["passage"] for row in protocol.training_rows("boolq")} - evaluated)
    random.Random(config.seed).shuffle(passages)
    source = "boolq_validation (bundled): passages of its training part no held-out question uses, shuffled"
    return passages, {"source": source, "protocol": protocol.record()}


def _prepared_token_ids(config: CalibrationConfig) -> tuple[list[int], dict[str, Any]]:
    """Token ids of a `data prepare` directory's samples (each up to its last loss token), shuffled by seed."""
    import numpy as np

    from modelzoo_ext.data.hdf5 import SampleDataset, read_params

    dataset = SampleDataset(config.data_dir)
    order = list(range(len(dataset)))
    random.Random(config.seed).shuffle(order)
    ids: list[int] = []
    for index in order:
        input_ids, loss_mask, labels = dataset[index]
        if loss_mask.any():  # the example's tokens: inputs up to its last loss position, then that label
            last = int(np.flatnonzero(loss_mask).max())
            ids += [*input_ids[: last + 1].tolist(), int(labels[last])]
        if len(ids) >= config.tokens:
            break
    params = read_params(config.data_dir)
    record = {
        "source": "prepared data (data prepare)",
        "path": str(Path(config.data_dir).resolve()),
        **{k: params.get(k) for k in ("task", "protocol", "split", "data_sha256", "tokenizer")},
    }
    return ids, record


def calibration_batches(tokenizer, config: CalibrationConfig) -> tuple[torch.Tensor, dict[str, Any]]:
    """Token ids [n_seq, seq_len] (n_seq = tokens // seq_len) and the record stored in the file."""
    seq_len = min(config.seq_len, config.tokens)
    needed = (config.tokens // seq_len) * seq_len
    if config.data_dir:
        ids, record = _prepared_token_ids(config)
    else:
        texts, record = _texts(config)
        ids: list[int] = []
        for text in texts:  # tokenize only as many passages as needed
            ids.extend(tokenizer(text + "\n\n")["input_ids"])
            if len(ids) >= needed:
                break
    import torch

    if len(ids) < needed:
        raise UserError(
            f"calibration text has {len(ids)} tokens, {needed} requested",
            where=record.get("path", record["source"]),
            fix="lower --calibration-tokens or give a longer --calibration-text",
        )
    batches = torch.tensor(ids[:needed], dtype=torch.long).reshape(-1, seq_len)
    record.update(tokens=needed, seq_len=seq_len, sequences=batches.shape[0], seed=config.seed)
    return batches, record


def load_model(model_dir: str | Path, device: str):
    """The HF causal LM (checkpoint dtype) and its tokenizer, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as exc:
        raise UserError(
            f"cannot load a tokenizer for calibration ({exc})",
            where=str(model_dir),
            fix="put the tokenizer files in the model directory",
        ) from exc
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype="auto").to(device)
    model.eval()
    return model, tokenizer


def _target_modules(model, names: list[str]) -> dict[str, torch.nn.Module]:
    import torch

    modules = dict(model.named_modules())
    found = {}
    for name in names:
        module = modules.get(name.removesuffix(".weight"))
        if not isinstance(module, torch.nn.Linear) or not name.endswith(".weight"):
            raise UserError(
                f"{name!r} is not the weight of an nn.Linear in the loaded model",
                where="calibration",
                fix="data-driven methods score Linear weights only; narrow --include",
            )
        found[name] = module
    return found


def input_channel_norms(model, names: list[str], batches: torch.Tensor) -> dict[str, torch.Tensor]:
    """name -> fp32 [in]: ||X_j||_2 over every calibration token reaching that Linear."""
    import torch
    from tqdm import tqdm

    modules = _target_modules(model, names)
    sums = {name: torch.zeros(m.in_features, dtype=torch.float64) for name, m in modules.items()}

    def hook_for(name):
        def hook(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            sums[name] += x.double().pow(2).sum(dim=0).cpu()

        return hook

    handles = [m.register_forward_pre_hook(hook_for(name)) for name, m in modules.items()]
    try:
        with torch.no_grad():
            for seq in tqdm(batches, desc="calibration (activations)", unit="seq", leave=False):
                model(seq[None].to(model.device))
    finally:
        for handle in handles:
            handle.remove()
    return {name: total.sqrt().float() for name, total in sums.items()}


def accumulated_gradients(model, names: list[str], batches: torch.Tensor) -> dict[str, torch.Tensor]:
    """name -> fp32 [out, in]: dL/dW of the mean LM loss, summed over calibration sequences."""
    from tqdm import tqdm

    modules = _target_modules(model, names)
    for param in model.parameters():
        param.requires_grad_(False)
    for module in modules.values():
        module.weight.requires_grad_(True)
        module.weight.grad = None
    for seq in tqdm(batches, desc="calibration (gradients)", unit="seq", leave=False):
        seq = seq[None].to(model.device)
        model(input_ids=seq, labels=seq).loss.backward()
    return {name: m.weight.grad.detach().float().cpu() for name, m in modules.items()}


def calibration_statistics(
    model_dir: str | Path, method: str, names: list[str], config: CalibrationConfig
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Per-tensor statistics for `method` ('wanda': input norms; else gradients) and the record."""
    model, tokenizer = load_model(model_dir, config.device)
    batches, record = calibration_batches(tokenizer, config)
    if method == "wanda":
        stats = input_channel_norms(model, names, batches)
    else:
        stats = accumulated_gradients(model, names, batches)
    del model
    return stats, record
