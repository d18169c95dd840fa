"""`masks compute` on tiny random Llamas saved with transformers: targets, exactness, metadata, outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from modelzoo_ext.errors import UserError
from modelzoo_ext.hf_checkpoint import HFCheckpoint
from modelzoo_ext.masks import MaskFile, TargetRule, load_masks, tensor_checksum
from modelzoo_ext.masks.calibration import CalibrationConfig
from modelzoo_ext.masks.compute import MaskRequest, compute_masks, level_paths

PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
SMALL_CALIBRATION = CalibrationConfig(tokens=128, seq_len=64, seed=0)


def weights(model_dir) -> dict[str, torch.Tensor]:
    checkpoint = HFCheckpoint(model_dir)
    return dict(checkpoint.iter_tensors())


def stable_keep(values: np.ndarray, kept: int) -> np.ndarray:
    order = np.argsort(-np.abs(values.astype(np.float64)), kind="stable")
    keep = np.zeros(values.size, dtype=bool)
    keep[order[:kept]] = True
    return keep


def test_default_targets_are_the_projections_only(tiny_llama_dir, tmp_path):
    (stats,) = compute_masks(
        tiny_llama_dir, MaskRequest(sparsities=(0.5,)), tmp_path / "m.safetensors", plot=False
    )
    names = set(stats["tensors"])
    assert len(names) == 2 * 7
    assert {n.split(".")[-2] for n in names} == PROJECTIONS
    all_names = set(HFCheckpoint(tiny_llama_dir).keys())
    untouched = all_names - names
    assert any("embed_tokens" in n for n in untouched) and "lm_head.weight" in untouched
    assert any("norm" in n for n in untouched)


def test_mixtral_and_router_names():
    rule = TargetRule()
    assert rule.matches("model.layers.3.block_sparse_moe.experts.7.w2.weight")
    assert not rule.matches("model.layers.3.block_sparse_moe.gate.weight")  # the router
    assert not rule.matches("model.layers.3.mlp.gate_proj.bias")
    assert TargetRule(exclude=r"k_proj").matches("model.layers.0.self_attn.q_proj.weight")
    assert not TargetRule(exclude=r"k_proj").matches("model.layers.0.self_attn.k_proj.weight")


def test_layer_scope_magnitude_equals_brute_force_and_metadata(tiny_llama_dir, tmp_path):
    out = tmp_path / "m.safetensors"
    compute_masks(tiny_llama_dir, MaskRequest(sparsities=(0.3,)), out, plot=True)
    masks, meta = load_masks(out)
    w = weights(tiny_llama_dir)
    for name, mask in masks.items():
        kept = mask.numel() - round(0.3 * mask.numel())
        assert np.array_equal(mask.numpy().reshape(-1), stable_keep(w[name].numpy().reshape(-1), kept))
        assert meta["tensors"][name]["source_checksum"] == tensor_checksum(w[name])
        assert meta["tensors"][name]["source_checksum"].startswith("blake3:")
    assert meta["method"] == "magnitude" and meta["scope"] == "layer" and meta["requested_sparsity"] == 0.3
    assert meta["target_rule"]["default"] is True
    assert meta["source_model"]["directory"] == str(tiny_llama_dir.resolve())
    stats = json.loads(out.with_name("m.stats.json").read_text())
    assert stats["achieved_sparsity"] == meta["achieved_sparsity"]
    assert out.with_name("m.png").stat().st_size > 1000


def test_global_scope_equals_brute_force_and_shards_do_not_matter(
    tiny_llama_dir, tiny_llama_sharded_dir, tmp_path
):
    request = MaskRequest(scope="global", sparsities=(0.25, 0.6))
    single = compute_masks(tiny_llama_dir, request, tmp_path / "a.safetensors", plot=False)
    sharded = compute_masks(tiny_llama_sharded_dir, request, tmp_path / "b.safetensors", plot=False)
    w = weights(tiny_llama_dir)
    for level, s_single, s_sharded in zip((0.25, 0.6), single, sharded, strict=True):
        a, _ = load_masks(s_single["mask_file"])
        b, _ = load_masks(s_sharded["mask_file"])
        names = sorted(a)
        assert all(torch.equal(a[n], b[n]) for n in names)
        values = np.concatenate([w[n].numpy().reshape(-1) for n in names])
        kept = values.size - round(level * values.size)
        got = np.concatenate([a[n].numpy().reshape(-1) for n in names])
        assert np.array_equal(got, stable_keep(values, kept))
    # nested: every weight kept at 60% is kept at 25%
    low, _ = load_masks(single[0]["mask_file"])
    high, _ = load_masks(single[1]["mask_file"])
    assert all(not (high[n] & ~low[n]).any() for n in low)


def test_level_file_names(tmp_path):
    assert level_paths(tmp_path / "m.safetensors", (0.5,)) == [tmp_path / "m.safetensors"]
    assert level_paths(tmp_path / "m.safetensors", (0.1, 0.9)) == [
        tmp_path / "m_sparsity0.1.safetensors",
        tmp_path / "m_sparsity0.9.safetensors",
    ]


def test_bf16_checkpoint_global_scope(tiny_llama_dir, tmp_path):
    bf16_dir = tmp_path / "bf16"
    bf16_dir.mkdir()
    from safetensors.torch import save_file

    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(tiny_llama_dir / "model.safetensors").items()}
    save_file(tensors, bf16_dir / "model.safetensors", metadata={"format": "pt"})
    (stats,) = compute_masks(
        bf16_dir, MaskRequest(scope="global", sparsities=(0.5,)), tmp_path / "m.safetensors", plot=False
    )
    masks, meta = load_masks(stats["mask_file"])
    names = sorted(masks)
    values = np.concatenate([tensors[n].float().numpy().reshape(-1) for n in names])
    got = np.concatenate([masks[n].numpy().reshape(-1) for n in names])
    assert np.array_equal(got, stable_keep(values, values.size // 2))


@pytest.mark.parametrize("structure", ["2:4", "rows", "cols"])
def test_structures_on_a_model(tiny_llama_dir, tmp_path, structure):
    sparsities = () if structure == "2:4" else (0.5,)
    (stats,) = compute_masks(
        tiny_llama_dir,
        MaskRequest(structure=structure, sparsities=sparsities),
        tmp_path / "m.safetensors",
        plot=False,
    )
    masks, meta = load_masks(stats["mask_file"])
    assert meta["structure"] == structure and meta["achieved_sparsity"] == 0.5
    for mask in masks.values():
        if structure == "2:4":
            assert (mask.reshape(mask.shape[0], -1, 4).sum(-1) == 2).all()
        elif structure == "rows":
            assert (mask.all(dim=1) | ~mask.any(dim=1)).all()
        else:
            assert (mask.all(dim=0) | ~mask.any(dim=0)).all()


def test_random_is_reproducible_and_seeded(tiny_llama_dir, tiny_llama_sharded_dir, tmp_path):
    a = compute_masks(
        tiny_llama_dir, MaskRequest(method="random", seed=5), tmp_path / "a.safetensors", plot=False
    )
    b = compute_masks(
        tiny_llama_sharded_dir, MaskRequest(method="random", seed=5), tmp_path / "b.safetensors", plot=False
    )
    c = compute_masks(
        tiny_llama_dir, MaskRequest(method="random", seed=6), tmp_path / "c.safetensors", plot=False
    )
    ma, meta = load_masks(a[0]["mask_file"])
    mb, _ = load_masks(b[0]["mask_file"])
    mc, _ = load_masks(c[0]["mask_file"])
    assert all(torch.equal(ma[n], mb[n]) for n in ma)
    assert not all(torch.equal(ma[n], mc[n]) for n in ma)
    assert meta["seed"] == 5 and meta["achieved_sparsity"] == 0.5


@pytest.mark.parametrize("method", ["wanda", "gradient", "taylor"])
def test_data_driven_methods_record_calibration(tiny_llama_dir, tmp_path, method):
    request = MaskRequest(method=method, sparsities=(0.5,), calibration=SMALL_CALIBRATION)
    (stats,) = compute_masks(tiny_llama_dir, request, tmp_path / "m.safetensors", plot=False)
    masks, meta = load_masks(stats["mask_file"])
    assert meta["calibration"]["tokens"] == 128 and meta["calibration"]["seq_len"] == 64
    assert meta["calibration"]["seed"] == 0 and "boolq" in meta["calibration"]["source"]
    for mask in masks.values():
        if method == "wanda":  # per output row, exactly half of each row
            assert (mask.sum(dim=1) == mask.shape[1] // 2).all()
        else:
            assert int(mask.sum()) == mask.numel() // 2
    magnitude = compute_masks(tiny_llama_dir, MaskRequest(), tmp_path / "mag.safetensors", plot=False)
    mag, _ = load_masks(magnitude[0]["mask_file"])
    assert not all(torch.equal(mag[n], masks[n]) for n in masks)  # the data changed the choice


def test_calibration_text_file(tiny_llama_dir, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    config = CalibrationConfig(text_file=str(text), tokens=96, seq_len=32)
    (stats,) = compute_masks(
        tiny_llama_dir,
        MaskRequest(method="wanda", calibration=config),
        tmp_path / "m.safetensors",
        plot=False,
    )
    meta = MaskFile(stats["mask_file"]).metadata
    assert meta["calibration"]["source"] == "file" and meta["calibration"]["sequences"] == 3
    short = CalibrationConfig(text_file=str(text), tokens=100_000, seq_len=32)
    with pytest.raises(UserError, match="tokens"):
        compute_masks(
            tiny_llama_dir, MaskRequest(method="wanda", calibration=short), tmp_path / "x.safetensors"
        )
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize(
    ("request_kwargs", "message"),
    [
        ({"sparsities": (1.0,)}, "outside"),
        ({"sparsities": (-0.1,)}, "outside"),
        ({"structure": "4:4"}, "N:M"),
        ({"structure": "2:4", "sparsities": (0.7,)}, "fixes the sparsity"),
        ({"scope": "global", "structure": "rows", "sparsities": (0.5,)}, "unstructured"),
        ({"include": r"nothing_matches", "sparsities": (0.5,)}, "matched no tensor"),
        ({"include": r"norm", "sparsities": (0.5,)}, "2-D"),
        ({"method": "bogus", "sparsities": (0.5,)}, "unknown method"),
    ],
)
def test_bad_requests_write_nothing(tiny_llama_dir, tmp_path, request_kwargs, message):
    with pytest.raises(UserError, match=message):
        compute_masks(tiny_llama_dir, MaskRequest(**request_kwargs), tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_non_finite_weight_is_refused(tiny_llama_dir, tmp_path):
    from safetensors.torch import save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    tensors = load_file(tiny_llama_dir / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"model.layers.1.mlp.up_proj.weight.*non-finite"):
        compute_masks(broken, MaskRequest(), tmp_path / "out" / "m.safetensors")
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_layer_fallback_when_the_count_search_gives_up(tiny_llama_dir, tmp_path, monkeypatch):
    from modelzoo_ext.masks import bracket

    bf16_dir = tmp_path / "bf16"
    bf16_dir.mkdir()
    from safetensors.torch import save_file

    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(tiny_llama_dir / "model.safetensors").items()}
    save_file(tensors, bf16_dir / "model.safetensors", metadata={"format": "pt"})
    request = MaskRequest(scope="layer", sparsities=(0.3, 0.7))
    fast = compute_masks(bf16_dir, request, tmp_path / "fast.safetensors", plot=False)
    monkeypatch.setattr(bracket, "MAX_PROBES", 0)  # every search gives up: full histograms decide
    slow = compute_masks(bf16_dir, request, tmp_path / "slow.safetensors", plot=False)
    for a, b in zip(fast, slow, strict=True):
        ma, _ = load_masks(a["mask_file"])
        mb, _ = load_masks(b["mask_file"])
        assert all(torch.equal(ma[n], mb[n]) for n in ma)


def test_global_fallback_when_the_counts_miss(tiny_llama_dir, tmp_path, monkeypatch):
    from modelzoo_ext.masks import window

    bf16_dir = tmp_path / "bf16"
    bf16_dir.mkdir()
    from safetensors.torch import save_file

    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(tiny_llama_dir / "model.safetensors").items()}
    save_file(tensors, bf16_dir / "model.safetensors", metadata={"format": "pt"})
    request = MaskRequest(scope="global", sparsities=(0.3, 0.7))
    fast = compute_masks(bf16_dir, request, tmp_path / "fast.safetensors", plot=False)
    # A guess far from the threshold: the counts cannot settle it, the key histograms must.
    monkeypatch.setattr(window, "first_count", lambda above, size, fraction: 5000)
    finished = []
    finish = window.GlobalCounts.finish
    monkeypatch.setattr(
        window.GlobalCounts, "finish", lambda self: finished.append(finish(self)) or finished[-1]
    )
    slow = compute_masks(bf16_dir, request, tmp_path / "slow.safetensors", plot=False)
    assert finished == [None]  # the counts missed: the histograms decided
    for a, b in zip(fast, slow, strict=True):
        ma, _ = load_masks(a["mask_file"])
        mb, _ = load_masks(b["mask_file"])
        assert all(torch.equal(ma[n], mb[n]) for n in ma)


def test_global_streams_when_one_pass_would_exceed_the_memory_bound(tiny_llama_dir, tmp_path, monkeypatch):
    """A model whose packed masks do not fit beside its largest shard (Mixtral-8x7B: 5.6 GB of
    masks, 4.9 GB shards) takes the streaming passes: the same masks, and the one-pass counts
    are never made."""
    from safetensors.torch import save_file

    from modelzoo_ext.masks import compute, window

    bf16_dir = tmp_path / "bf16"
    bf16_dir.mkdir()
    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(tiny_llama_dir / "model.safetensors").items()}
    save_file(tensors, bf16_dir / "model.safetensors", metadata={"format": "pt"})
    request = MaskRequest(scope="global", sparsities=(0.3, 0.7))
    one_pass = compute_masks(bf16_dir, request, tmp_path / "one.safetensors", plot=False)
    monkeypatch.setattr(compute, "_one_pass_allowance", lambda checkpoint: 0)
    monkeypatch.setattr(window, "count_window", lambda *a: pytest.fail("one-pass counts made"))
    streamed = compute_masks(bf16_dir, request, tmp_path / "streamed.safetensors", plot=False)
    for a, b in zip(one_pass, streamed, strict=True):
        ma, _ = load_masks(a["mask_file"])
        mb, _ = load_masks(b["mask_file"])
        assert ma.keys() == mb.keys() and all(torch.equal(ma[n], mb[n]) for n in ma)


def _open_files_under(directory) -> list[str]:
    """Files under `directory` this process still holds open (the writers' spools included)."""
    import os

    links = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            links.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue
    return [link for link in links if link.startswith(str(directory))]


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_an_error_mid_way_leaves_nothing_and_closes_every_writer(
    tiny_llama_dir, tmp_path, monkeypatch, scope
):
    """An error after some masks were handed to the writers (here the spool's disk filling up):
    no file under any final name, no temporary left, and every level's spool closed."""
    from modelzoo_ext.masks.format import MaskWriter

    add_packed, added = MaskWriter.add_packed, []

    def failing_add_packed(self, name, mask, *, source_checksum=None):
        added.append(name)
        if len(added) == 7:
            raise OSError("no space left on device")
        return add_packed(self, name, mask, source_checksum=source_checksum)

    monkeypatch.setattr(MaskWriter, "add_packed", failing_add_packed)
    out = tmp_path / "out"
    # The caller keeps the exception (and so its traceback's frames): the spools must be closed
    # by compute_masks itself, not by the garbage collector.
    with pytest.raises(OSError, match="no space left") as failed:
        compute_masks(tiny_llama_dir, MaskRequest(scope=scope, sparsities=(0.3, 0.6)), out / "m.safetensors")
    assert len(added) == 7  # 3 tensors' masks at both levels were spooled before the error
    assert list(out.iterdir()) == []
    assert _open_files_under(tmp_path) == [], failed.value


def test_an_error_writing_a_later_level_leaves_no_level_written(tiny_llama_dir, tmp_path, monkeypatch):
    """Levels are written together: when the second level's figure fails, neither level's mask
    file, stats or figure appears."""
    from matplotlib.figure import Figure

    savefig, saved = Figure.savefig, []

    def failing_savefig(self, *args, **kwargs):
        saved.append(1)
        if len(saved) == 2:
            raise OSError("no space left on device")
        return savefig(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", failing_savefig)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="no space left") as failed:
        compute_masks(tiny_llama_dir, MaskRequest(sparsities=(0.3, 0.6)), out / "m.safetensors")
    assert len(saved) == 2
    assert list(out.iterdir()) == []
    assert _open_files_under(tmp_path) == [], failed.value
