"""`masks import`: seed .pt (opt-in, weights_only), .npz, zeros of a pruned checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modelzoo_ext.errors import UserError
from modelzoo_ext.masks import load_masks, tensor_checksum
from modelzoo_ext.masks.apply import apply_masks
from modelzoo_ext.masks.compute import MaskRequest, compute_masks
from modelzoo_ext.masks.importers import import_masks


@pytest.fixture(scope="module")
def reference(tiny_llama_dir, tmp_path_factory):
    """Masks computed by this tool (random, 50% per tensor): the ground truth imports must reproduce."""
    out = tmp_path_factory.mktemp("ref") / "m.safetensors"
    compute_masks(tiny_llama_dir, MaskRequest(method="random", seed=3), out, plot=False)
    return load_masks(out)[0]


def _modules(masks):
    return {name.removesuffix(".weight"): mask for name, mask in masks.items()}


def test_seed_pt_needs_opt_in_then_loads_weights_only(reference, tiny_llama_dir, tmp_path):
    old = tmp_path / "seed_masks.pt"
    torch.save({"masks": _modules(reference), "metadata": {"sparsity": 0.5, "method": "random"}}, old)
    with pytest.raises(UserError, match="pickle"):
        import_masks(old, tiny_llama_dir, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()
    meta = import_masks(old, tiny_llama_dir, tmp_path / "m.safetensors", allow_pickle=True)
    masks, _ = load_masks(tmp_path / "m.safetensors")
    assert masks.keys() == reference.keys()
    assert all(torch.equal(masks[n], reference[n]) for n in masks)
    assert meta["imported_from"]["original_metadata"] == {"sparsity": 0.5, "method": "random"}
    from modelzoo_ext.hf_checkpoint import HFCheckpoint

    weight = HFCheckpoint(tiny_llama_dir).get("model.layers.0.mlp.up_proj.weight")
    assert meta["tensors"]["model.layers.0.mlp.up_proj.weight"]["source_checksum"] == tensor_checksum(weight)


class NotATensor:
    pass


def test_pt_with_arbitrary_objects_is_refused(reference, tiny_llama_dir, tmp_path):
    old = tmp_path / "evil.pt"
    torch.save({"masks": _modules(reference), "metadata": NotATensor()}, old)
    with pytest.raises(UserError, match="weights_only"):
        import_masks(old, tiny_llama_dir, tmp_path / "m.safetensors", allow_pickle=True)
    assert not (tmp_path / "m.safetensors").exists()


def test_npz_with_01_arrays(reference, tiny_llama_dir, tmp_path):
    old = tmp_path / "masks.npz"
    np.savez(old, **{name: mask.numpy().astype(np.uint8) for name, mask in reference.items()})
    import_masks(old, tiny_llama_dir, tmp_path / "m.safetensors")
    masks, meta = load_masks(tmp_path / "m.safetensors")
    assert all(torch.equal(masks[n], reference[n]) for n in reference)
    assert meta["method"] == "imported" and meta["imported_from"]["format"] == "npz"


def test_npz_errors(reference, tiny_llama_dir, tmp_path):
    arrays = {name: mask.numpy() for name, mask in reference.items()}
    cases = {
        "values other than 0/1": {**arrays, "model.layers.0.mlp.up_proj.weight": np.full((128, 64), 2.0)},
        "matches no tensor": {**arrays, "model.layers.5.mlp.up_proj": np.ones((128, 64), bool)},
        "mask shape": {**arrays, "model.layers.0.mlp.up_proj.weight": np.ones((64, 128), bool)},
        "targeted tensors have no mask": {k: v for k, v in arrays.items() if "v_proj" not in k},
    }
    for message, content in cases.items():
        old = tmp_path / "bad.npz"
        np.savez(old, **content)
        with pytest.raises(UserError, match=message):
            import_masks(old, tiny_llama_dir, tmp_path / "m.safetensors")
        assert not (tmp_path / "m.safetensors").exists()
    partial = {k: v for k, v in arrays.items() if "v_proj" in k}
    np.savez(tmp_path / "v.npz", **partial)
    meta = import_masks(
        tmp_path / "v.npz", tiny_llama_dir, tmp_path / "v.safetensors", include=r"v_proj\.weight$"
    )
    assert len(meta["tensors"]) == 2


def test_zeros_of_a_pruned_checkpoint(tiny_llama_sharded_dir, tmp_path):
    computed = tmp_path / "m.safetensors"
    compute_masks(tiny_llama_sharded_dir, MaskRequest(structure="2:4"), computed, plot=False)
    apply_masks(tiny_llama_sharded_dir, computed, tmp_path / "pruned")
    import_masks(tmp_path / "pruned", tiny_llama_sharded_dir, tmp_path / "back.safetensors")
    expected, _ = load_masks(computed)
    got, meta = load_masks(tmp_path / "back.safetensors")
    assert all(torch.equal(expected[n], got[n]) for n in expected)
    assert meta["imported_from"]["format"] == "zeros of a pruned checkpoint"


def test_unknown_suffix_is_refused(tiny_llama_dir, tmp_path):
    old = tmp_path / "masks.json"
    old.write_text("{}")
    with pytest.raises(UserError, match="cannot import"):
        import_masks(old, tiny_llama_dir, tmp_path / "m.safetensors")
