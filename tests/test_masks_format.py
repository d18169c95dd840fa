"""The mask file's checksums: version 2 (BLAKE3, named) and version 1 (sha256) files are read,
verified, and refused when one bit changes; `masks apply` and `masks validate --model` refuse
weights other than the recorded ones, for both versions.

`tests/golden/masks_v1_sha256.safetensors` was written by the implementation at d837448
(format version 1) for the golden bf16 checkpoint of `test_masks_golden.py` (global magnitude
masks of the two k projections at 50%).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_masks_golden import write_checkpoint

from modelzoo_ext.errors import UserError
from modelzoo_ext.hf_checkpoint import HFCheckpoint
from modelzoo_ext.masks import MaskFile, checksum, load_masks, tensor_checksum, tensor_sha256
from modelzoo_ext.masks.apply import apply_masks
from modelzoo_ext.masks.compute import MaskRequest, compute_masks
from modelzoo_ext.masks.format import METADATA_KEY, MaskWriter, _metadata_digest, pack_bits
from modelzoo_ext.masks.validate import validate_masks

V1_FILE = Path(__file__).parent / "golden" / "masks_v1_sha256.safetensors"
K_PROJ = r"layers\.[01]\.self_attn\.k_proj\.weight$"
CHANGED = "model.layers.1.self_attn.k_proj.weight"


@pytest.fixture(scope="module")
def golden_bf16(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("golden") / "bf16", "bfloat16")


@pytest.fixture(scope="module")
def changed_bf16(golden_bf16, tmp_path_factory) -> Path:
    """The golden checkpoint with one bit of one targeted weight flipped."""
    changed = tmp_path_factory.mktemp("changed") / "bf16"
    shutil.copytree(golden_bf16, changed)
    shard = (
        changed / json.loads((changed / "model.safetensors.index.json").read_text())["weight_map"][CHANGED]
    )
    tensors = load_file(shard)
    tensors[CHANGED].view(torch.int16)[3, 5] ^= 1
    save_file(tensors, shard, metadata={"format": "pt"})
    return changed


@pytest.fixture(scope="module")
def v2_file(golden_bf16, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("v2") / "m.safetensors"
    request = MaskRequest(scope="global", sparsities=(0.5,), include=K_PROJ)
    compute_masks(golden_bf16, request, out, plot=False)
    return out


def test_v2_files_name_blake3_and_match_the_weights(v2_file, golden_bf16):
    mask_file = MaskFile(v2_file)
    weights = dict(HFCheckpoint(golden_bf16).iter_tensors(mask_file.keys()))
    assert mask_file.version == 2
    for name in mask_file.keys():  # noqa: SIM118 (not a dict)
        info = mask_file.info(name)
        assert info["source_checksum"] == mask_file.source_checksum(name) == tensor_checksum(weights[name])
        assert info["mask_checksum"].startswith("blake3:") and info["source_checksum"].startswith("blake3:")
        assert "source_sha256" not in info and "mask_sha256" not in info


def test_v1_files_stay_readable_and_verified(golden_bf16):
    mask_file = MaskFile(V1_FILE)
    assert mask_file.version == 1
    weights = dict(HFCheckpoint(golden_bf16).iter_tensors(mask_file.keys()))
    masks, metadata = load_masks(V1_FILE)  # every mask's sha256 verified
    for name, mask in masks.items():
        assert mask_file.source_checksum(name) == f"sha256:{tensor_sha256(weights[name])}"
        assert mask_file.mask_checksum(name).startswith("sha256:")
        assert int(mask.sum()) == metadata["tensors"][name]["kept"]


def test_v1_and_v2_files_hold_the_same_masks(v2_file):
    old, _ = load_masks(V1_FILE)
    new, _ = load_masks(v2_file)
    assert old.keys() == new.keys() and all(torch.equal(old[n], new[n]) for n in old)


@pytest.mark.parametrize("which", ["v1", "v2"])
def test_validate_against_the_model(which, v2_file, golden_bf16, changed_bf16):
    path, algorithm = (V1_FILE, "sha256") if which == "v1" else (v2_file, "blake3")
    good = validate_masks(path, model_dir=golden_bf16)
    assert good["valid"], [c for c in good["checks"] if not c["ok"]]
    assert {c["check"] for c in good["checks"] if c["check"].startswith("source ")} == {
        f"source {algorithm} model.layers.{i}.self_attn.k_proj.weight" for i in (0, 1)
    }
    bad = validate_masks(path, model_dir=changed_bf16)
    assert [c["check"] for c in bad["checks"] if not c["ok"]] == [f"source {algorithm} {CHANGED}"]


@pytest.mark.parametrize("which", ["v1", "v2"])
def test_apply_refuses_other_weights(which, v2_file, golden_bf16, changed_bf16, tmp_path):
    path = V1_FILE if which == "v1" else v2_file
    apply_masks(golden_bf16, path, tmp_path / "pruned")
    with pytest.raises(UserError, match=f"{CHANGED}.*differs from the one the masks were computed for"):
        apply_masks(changed_bf16, path, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


@pytest.mark.parametrize("which", ["v1", "v2"])
def test_every_flipped_bit_fails(which, v2_file, tmp_path):
    data = (V1_FILE if which == "v1" else v2_file).read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    # Every byte of the length prefix and of the tensor data, and a stride through the JSON header.
    positions = (
        list(range(8)) + list(range(8, 8 + header_len, 11)) + list(range(8 + header_len, len(data), 5))
    )
    tampered = tmp_path / "t.safetensors"
    for position in positions:
        flipped = bytearray(data)
        flipped[position] ^= 1 << (position % 8)
        tampered.write_bytes(bytes(flipped))
        assert not validate_masks(tampered)["valid"], f"flip at byte {position} went unnoticed"


def _rewrite_metadata(source: Path, target: Path, change) -> None:
    """Copy a mask file with its metadata changed by `change` (and a matching metadata digest)."""
    from safetensors.numpy import save_file as save_numpy

    mask_file = MaskFile(source)
    metadata = json.loads(json.dumps(mask_file.metadata))
    change(metadata)
    metadata["metadata_sha256"] = _metadata_digest(metadata)
    tensors = {name: mask_file.packed(name) for name in mask_file.keys()}  # noqa: SIM118 (not a dict)
    save_numpy(tensors, str(target), metadata={METADATA_KEY: json.dumps(metadata)})


def test_unknown_algorithm_and_version_are_refused_clearly(v2_file, tmp_path):
    name = MaskFile(v2_file).keys()[0]
    unknown = tmp_path / "unknown.safetensors"
    _rewrite_metadata(v2_file, unknown, lambda m: m["tensors"][name].update(mask_checksum="md5:00"))
    with pytest.raises(UserError, match="unknown checksum"):
        MaskFile(unknown).get(name)
    newer = tmp_path / "newer.safetensors"
    _rewrite_metadata(v2_file, newer, lambda m: m.update(format_version=3))
    with pytest.raises(UserError, match="format version 3 is not supported"):
        MaskFile(newer)


def test_checksums_of_torch_and_numpy_agree():
    values = torch.randn(7, 9).to(torch.bfloat16)
    bits = values.view(torch.int16).numpy()
    assert tensor_checksum(values) == checksum.array_checksum(bits) == checksum.digest(bits.tobytes())
    assert tensor_checksum(values, "sha256") == f"sha256:{tensor_sha256(values)}"
    assert checksum.matches(tensor_checksum(values), values)
    assert not checksum.matches(tensor_checksum(values), values + 1)
    with pytest.raises(UserError, match="unknown checksum"):
        checksum.algorithm_of("crc32:1234")
    assert np.array_equal(bits, values.view(torch.int16).numpy())  # hashing copied nothing back


def test_converters_carry_source_checksums(golden_bf16, tmp_path):
    from mask_converters.mask_files import convert_mask_file
    from modelzoo_ext.name_map import RopeLayout

    v2 = tmp_path / "v2.safetensors"
    include = r"layers\.0\.(self_attn\.[kv]_proj|mlp\.up_proj)\.weight$"
    compute_masks(golden_bf16, MaskRequest(sparsities=(0.5,), include=include), v2, plot=False)
    layout = RopeLayout(num_heads=4, num_kv_heads=2, head_dim=64, rotary_dim=64)
    for path in (V1_FILE, v2):
        cs = tmp_path / f"{path.stem}_cs.safetensors"
        convert_mask_file(path, cs, "llama", layout, to_naming="cs")
        back = tmp_path / f"{path.stem}_hf.safetensors"
        convert_mask_file(cs, back, "llama", layout, to_naming="hf")
        original, converted = MaskFile(path), MaskFile(back)
        assert converted.version == 2 and converted.keys() == original.keys()
        for name in original.keys():  # noqa: SIM118 (not a dict)
            assert torch.equal(original.get(name), converted.get(name))
            if "k_proj" in name:  # rows permuted on the way: the checksum no longer applies
                assert converted.source_checksum(name) is None
            else:  # carried over as recorded, with its algorithm
                assert converted.source_checksum(name) == original.source_checksum(name) is not None


def test_the_mask_writer_writes_what_safetensors_writes(tmp_path):
    """`MaskWriter` assembles the file itself (from its spool); byte for byte it is what
    `safetensors.numpy.save_file` writes, whatever the tensor sizes (header padding) and
    whatever characters the provenance holds (JSON escapes, non-ASCII)."""
    from safetensors.numpy import save_file as save_numpy

    rng = np.random.default_rng(0)
    masks = {f"model.layers.{i}.mlp.up_proj.weight": rng.random((i + 1, 13 * i + 5)) < 0.5 for i in range(12)}
    provenance = {"note": 'quote " backslash \\ newline \n données', "levels": [1, 2]}
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    writer = MaskWriter(ours, naming="hf", metadata=provenance)
    for name in reversed(list(masks)):
        writer.add(name, masks[name])
    metadata = writer.write()
    packed = {name: pack_bits(mask) for name, mask in masks.items()}
    save_numpy(packed, str(theirs), metadata={METADATA_KEY: json.dumps(metadata, sort_keys=True)})
    assert ours.read_bytes() == theirs.read_bytes()
    assert metadata["note"] == provenance["note"]
