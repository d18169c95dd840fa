"""Calibration hooks against direct computations on a tiny Llama."""

from __future__ import annotations

import torch

from modelzoo_ext.masks.calibration import (
    CalibrationConfig,
    accumulated_gradients,
    calibration_batches,
    input_channel_norms,
    load_model,
)

Q0 = "model.layers.0.self_attn.q_proj.weight"
Q1 = "model.layers.1.self_attn.q_proj.weight"
UP1 = "model.layers.1.mlp.up_proj.weight"


def test_batches_are_seeded_and_sized(tiny_llama_dir):
    _, tokenizer = load_model(tiny_llama_dir, "cpu")
    a, record = calibration_batches(tokenizer, CalibrationConfig(tokens=200, seq_len=64, seed=1))
    b, _ = calibration_batches(tokenizer, CalibrationConfig(tokens=200, seq_len=64, seed=1))
    c, _ = calibration_batches(tokenizer, CalibrationConfig(tokens=200, seq_len=64, seed=2))
    assert a.shape == (3, 64) and torch.equal(a, b) and not torch.equal(a, c)
    assert record["tokens"] == 192 and record["sequences"] == 3


def test_input_norms_equal_direct_activations(tiny_llama_dir):
    model, tokenizer = load_model(tiny_llama_dir, "cpu")
    batches, _ = calibration_batches(tokenizer, CalibrationConfig(tokens=128, seq_len=64))
    norms = input_channel_norms(model, [Q0, Q1], batches)
    expected = {Q0: torch.zeros(64, dtype=torch.float64), Q1: torch.zeros(64, dtype=torch.float64)}
    with torch.no_grad():
        for seq in batches:
            hidden = model(seq[None], output_hidden_states=True).hidden_states
            for index, name in enumerate((Q0, Q1)):
                x = model.model.layers[index].input_layernorm(hidden[index])
                expected[name] += x.double().pow(2).sum(dim=(0, 1))
    for name in (Q0, Q1):
        torch.testing.assert_close(norms[name], expected[name].sqrt().float(), rtol=1e-5, atol=1e-6)


def test_gradients_accumulate_over_sequences(tiny_llama_dir):
    model, tokenizer = load_model(tiny_llama_dir, "cpu")
    batches, _ = calibration_batches(tokenizer, CalibrationConfig(tokens=128, seq_len=64))
    grads = accumulated_gradients(model, [Q0, UP1], batches)
    reference, _ = load_model(tiny_llama_dir, "cpu")
    total = sum(reference(input_ids=s[None], labels=s[None]).loss for s in batches)
    total.backward()
    modules = dict(reference.named_modules())
    for name in (Q0, UP1):
        expected = modules[name.removesuffix(".weight")].weight.grad
        assert grads[name].abs().sum() > 0
        torch.testing.assert_close(grads[name], expected, rtol=1e-4, atol=1e-7)


def test_calibration_never_reads_evaluated_examples(tmp_path, tiny_llama_dir):
    """The default text is the passages of BoolQ's training part; --calibration-data reads a prepared
    (training) directory's token ids; both are recorded."""
    from modelzoo_ext.cli import main
    from modelzoo_ext.data.hdf5 import SampleDataset
    from modelzoo_ext.data.protocol import DataProtocol

    _, tokenizer = load_model(tiny_llama_dir, "cpu")
    _, record = calibration_batches(tokenizer, CalibrationConfig(tokens=256, seq_len=64, seed=0))
    assert "training part" in record["source"] and record["protocol"]["protocol"] == "offline"
    held_out = {row["passage"] for row in DataProtocol("offline", "bundled").evaluated_rows("boolq")}
    from modelzoo_ext.masks import calibration

    passages, _ = calibration._texts(CalibrationConfig(seed=0))
    assert passages and not set(passages) & held_out

    data = tmp_path / "train"
    argv = ["data", "prepare", "--task", "boolq", "--tokenizer", str(tiny_llama_dir), "--max-seq-length", "512",
            "--split", "train", "--out", str(data)]  # fmt: skip
    assert main(argv) == 0
    batches, record = calibration_batches(
        tokenizer, CalibrationConfig(data_dir=str(data), tokens=256, seq_len=64)
    )
    assert record["source"] == "prepared data (data prepare)" and record["split"] == "train"
    assert record["data_sha256"] and batches.shape == (4, 64)
    dataset = SampleDataset(data)
    every_token = {int(t) for i in range(len(dataset)) for t in dataset[i][0]} | {
        int(t) for i in range(len(dataset)) for t in dataset[i][2]
    }
    assert set(batches.flatten().tolist()) <= every_token
