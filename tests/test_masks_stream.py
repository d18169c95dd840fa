"""The read-ahead pipeline and the torch-free reader: same bytes as safetensors, bounded memory,
results in order, errors raised in the caller with nothing left running."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from test_masks_golden import write_checkpoint

from modelzoo_ext.errors import UserError
from modelzoo_ext.hf_checkpoint import HFCheckpoint
from modelzoo_ext.masks.stream import BufferPool, local_buffer, pipeline
from modelzoo_ext.safetensors_file import TensorEntry, read_header


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stream")
    return {dtype: write_checkpoint(root / dtype, dtype) for dtype in ("bfloat16", "float32")}


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_reader_gives_the_bytes_safetensors_gives(checkpoints, dtype):
    checkpoint = HFCheckpoint(checkpoints[dtype])
    entries = checkpoint.entries(checkpoint.keys())
    assert sorted(e.name for e in entries) == checkpoint.keys()
    for shard in checkpoint.shards():
        offsets = [e.begin for e in entries if e.shard == shard]
        assert offsets == sorted(offsets)  # file order within each shard
    for entry in entries:
        with safe_open(str(entry.shard), framework="pt") as f:
            tensor = f.get_tensor(entry.name)
        assert entry.shape == tuple(tensor.shape) and entry.dtype == str(tensor.dtype).removeprefix("torch.")
        expected = tensor.contiguous().view(-1).view(__import__("torch").uint8).numpy()
        assert np.array_equal(checkpoint.read(entry), expected)
        out = np.zeros(entry.nbytes, dtype=np.uint8)
        assert checkpoint.read(entry, out) is out and np.array_equal(out, expected)


def _safetensors_bytes(header: dict, data: bytes) -> bytes:
    encoded = json.dumps(header).encode()
    return len(encoded).to_bytes(8, "little") + encoded + data


def _two_tensors(**changes) -> dict:
    header = {
        "a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
        "b": {"dtype": "BF16", "shape": [1], "data_offsets": [2, 4]},
    }
    for name, entry in changes.items():
        header[name] = {**header.get(name, {}), **entry} if entry is not None else None
    return {name: entry for name, entry in header.items() if entry is not None}


BAD_FILES = {
    "bytes after the data": _safetensors_bytes(_two_tensors(), b"1234xx"),
    "a gap": _safetensors_bytes(_two_tensors(b={"data_offsets": [3, 5]}), b"12345"),
    "an overlap": _safetensors_bytes(_two_tensors(b={"data_offsets": [1, 3]}), b"123"),
    "a size off its shape": _safetensors_bytes(_two_tensors(b={"shape": [2]}), b"1234"),
    "an unknown dtype": _safetensors_bytes(_two_tensors(b={"dtype": "F7"}), b"1234"),
    "metadata not strings": _safetensors_bytes({"__metadata__": {"x": 1}, **_two_tensors()}, b"1234"),
    "no offsets": _safetensors_bytes(_two_tensors(b={"data_offsets": None}), b"1234"),
}
GOOD_FILES = {
    "names out of offset order": _safetensors_bytes(
        {"b": _two_tensors()["b"], "a": _two_tensors()["a"], "__metadata__": {"format": "pt"}}, b"1234"
    ),
    "8-bit floats": _safetensors_bytes(_two_tensors(b={"dtype": "F8_E4M3", "shape": [2]}), b"1234"),
    "no tensors": _safetensors_bytes({}, b""),
}


@pytest.mark.parametrize("what", BAD_FILES)
def test_the_header_reader_refuses_what_safetensors_refuses(tmp_path, what):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(BAD_FILES[what])
    with pytest.raises(Exception):  # noqa: B017 (safetensors raises its own error types)
        safe_open(str(path), framework="numpy")
    with pytest.raises(UserError, match="truncated or corrupt") as refused:
        read_header(path)
    assert refused.value.where == str(path)


@pytest.mark.parametrize("what", GOOD_FILES)
def test_the_header_reader_reads_what_safetensors_reads(tmp_path, what):
    path = tmp_path / "good.safetensors"
    path.write_bytes(GOOD_FILES[what])
    with safe_open(str(path), framework="numpy") as f:
        names = sorted(f.keys())
    header = read_header(path)
    assert sorted(header.tensors) == names
    assert list(header.tensors) == sorted(names, key=lambda n: header.tensors[n].begin)  # file order


def test_corrupt_and_truncated_shards_are_refused(checkpoints, tmp_path):
    checkpoint = HFCheckpoint(checkpoints["bfloat16"])
    shard = next(iter(checkpoint.shards()))
    data = shard.read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((len(data) * 2).to_bytes(8, "little") + data[8:])
    with pytest.raises(UserError, match="header length"):
        read_header(bad)
    for broken in (b"x", b"["):
        bad.write_bytes(data[:8] + broken + data[9:])
        with pytest.raises(UserError, match="not JSON|not a JSON object"):
            read_header(bad)
    bad.write_bytes(data[: len(data) - 10])
    with pytest.raises(UserError, match="the tensors end at byte"):
        read_header(bad)
    entry = max(read_header(shard).tensors.values(), key=lambda e: e.end)
    bad.write_bytes(data)
    truncated = TensorEntry(entry.name, bad, entry.dtype, entry.shape, entry.begin, entry.end)
    bad.write_bytes(data[: entry.end - 2])
    with pytest.raises(UserError, match="truncated"):
        checkpoint.read(truncated)


def _entries(sizes: list[int]) -> list[TensorEntry]:
    return [TensorEntry(f"t{i}", Path("-"), "uint8", (n,), 0, n) for i, n in enumerate(sizes)]


def test_results_in_order_and_memory_bounded():
    held, peak, lock = [0], [0], threading.Lock()

    def read(entry, out):
        with lock:
            held[0] += entry.nbytes
            peak[0] = max(peak[0], held[0])
        out[:] = int(entry.name[1:]) % 251
        return out

    def work(entry, raw):
        value = int(raw[0])
        with lock:
            held[0] -= entry.nbytes
        return entry.name, value

    sizes = [1000, 3000, 500, 2000, 2000, 4500, 100] * 5
    results = list(pipeline(read, _entries(sizes), work, workers=2, budget=5000))
    assert results == [(f"t{i}", i % 251) for i in range(len(sizes))]
    assert peak[0] <= 5000


def test_a_tensor_larger_than_the_budget_passes_alone():
    results = list(pipeline(lambda e, out: out, _entries([10, 50, 10]), lambda e, raw: raw.size, budget=20))
    assert results == [10, 50, 10]


@pytest.mark.parametrize("where", ["read", "work"])
def test_errors_reach_the_caller_and_stop_every_thread(where):
    before = threading.active_count()

    def read(entry, out):
        if where == "read" and entry.name == "t5":
            raise UserError("cannot read t5")
        return out

    def work(entry, raw):
        if where == "work" and entry.name == "t5":
            raise UserError("bad t5")
        return entry.name

    seen = []
    with pytest.raises(UserError, match="t5"):
        for name in pipeline(read, _entries([100] * 20), work, workers=2, budget=300):
            seen.append(name)
    assert seen == [f"t{i}" for i in range(5)]
    assert threading.active_count() == before


def test_stopping_early_stops_the_reader():
    before = threading.active_count()
    results = pipeline(lambda e, out: out, _entries([100] * 50), lambda e, raw: e.name, budget=200)
    assert next(results) == "t0"
    results.close()
    assert threading.active_count() == before


def test_buffers_are_reused():
    pool = BufferPool(limit=1000)
    first = pool.acquire(400)
    pool.release(first)
    assert pool.acquire(300) is first  # the freed buffer fits: no new allocation
    a = local_buffer("x", 10, np.int16)
    assert local_buffer("x", 5, np.int16).base is a.base
