"""Benchmark `masks compute` (magnitude) on a synthetic sharded bf16 checkpoint; prints a table.

    python benchmarks/masks.py                 # 1.1B-like (hidden 2048, intermediate 5632, 22 layers)
    python benchmarks/masks.py --shape 7b      # 7B-like (hidden 4096, intermediate 11008, 32 layers)
    python benchmarks/masks.py --shape small   # quick check (a few hundred MB)
    python benchmarks/masks.py --shape mixtral-scaled  # Mixtral-8x7B's depth, 8 experts and 19 shards,
                                               # width / 4 (~5.8 GB; benchmarks/masks_mixtral.py)
    python benchmarks/masks.py --cache cold    # only the cold rows (default: cold and warm)

Every row runs in a fresh process on the same files, in one run. `cold`: the checkpoint's pages
are evicted from the page cache first (`posix_fadvise(DONTNEED)`), as for a fresh download;
`warm`: they were just read. Rows:
- cat: `cat` of the shard files (whole files, so also the embeddings the masks skip);
- read: the targeted tensors read by the tool's own reader (`stream.pipeline`, work = nothing):
  the ceiling of any mask method, and the "cold read of the same files" of the targets;
- checksum: the same plus the BLAKE3 of every tensor on two workers: the checksum alone;
- layer / global: `compute_masks(..., MaskRequest(method="magnitude", scope=...))` inside
  the process (imports not timed): exact counts, source checksums, bit-packed files, no figure;
- cli layer / cli global: `python -m modelzoo_ext.cli masks compute ...`, the command users
  run, timed as a whole process (start-up included), so the library and the CLI cannot drift;
- startup: that command on a tiny one-layer model (median of 3): what every run pays.
GB/s counts the bytes of the targeted bf16 weights. "cpu s" is the row's user+sys time: with
others sharing the machine, wall time may not show two cores; the cores free at the start
of the run are measured and printed. Targets (issue 15) are checked on this run's rows.
The parent process imports only the standard library, so the children's peak RSS (from
`wait4`, which counts what a child inherits) is theirs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {  # hidden, intermediate, layers, attention heads, kv heads, vocab
    "small": (1024, 2816, 4, 16, 4, 32000),
    "1.1b": (2048, 5632, 22, 32, 4, 32000),
    "7b": (4096, 11008, 32, 32, 32, 32000),
    "tiny1": (256, 704, 1, 4, 2, 1000),  # the start-up row's one-layer model
}
MIXTRAL_SHAPES = ("mixtral-small", "mixtral-scaled")  # benchmarks/masks_mixtral.py's small / scaled
IN_PROCESS = ("read", "checksum", "layer", "global")
CLI = ("cli layer", "cli global")
ROWS = ("cat",) + IN_PROCESS + CLI
REPO = Path(__file__).resolve().parents[1]


def model_tensors(shape: str) -> list[tuple[str, tuple[int, int]]]:
    """(name, shape) of a Llama-like (or Mixtral-like) model in Hugging Face naming and order."""
    if shape in MIXTRAL_SHAPES:
        return _mixtral().model_tensors(shape.removeprefix("mixtral-"))
    hidden, inter, layers, heads, kv_heads, vocab = SHAPES[shape]
    kv = hidden // heads * kv_heads
    names = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}"
        names += [
            (f"{p}.self_attn.q_proj.weight", (hidden, hidden)),
            (f"{p}.self_attn.k_proj.weight", (kv, hidden)),
            (f"{p}.self_attn.v_proj.weight", (kv, hidden)),
            (f"{p}.self_attn.o_proj.weight", (hidden, hidden)),
            (f"{p}.mlp.gate_proj.weight", (inter, hidden)),
            (f"{p}.mlp.up_proj.weight", (inter, hidden)),
            (f"{p}.mlp.down_proj.weight", (hidden, inter)),
            (f"{p}.input_layernorm.weight", (hidden,)),
            (f"{p}.post_attention_layernorm.weight", (hidden,)),
        ]
    return names + [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]


def write_checkpoint(directory: Path, shape: str, shard_bytes: int) -> None:
    """Random bf16 weights (std 0.02) in shards of about `shard_bytes`, with an index.

    Shards are planned from the shapes first and generated one at a time, so this process
    never holds more than one shard. Runs in a child process (it imports torch).
    """
    import torch
    from safetensors.torch import save_file

    plan: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, dims in model_tensors(shape):
        nbytes = 2 * int(torch.tensor(dims).prod())
        if size and size + nbytes > shard_bytes:
            plan.append([])
            size = 0
        plan[-1].append((name, dims))
        size += nbytes
    generator = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for i, entries in enumerate(plan):
        file = f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
        tensors = {
            name: (torch.randn(dims, generator=generator) * 0.02).to(torch.bfloat16) for name, dims in entries
        }
        save_file(tensors, str(directory / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        total += sum(t.numel() * 2 for t in tensors.values())
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    config = {"model_type": "llama"}
    if shape in MIXTRAL_SHAPES:
        config = _mixtral().hf_config(shape.removeprefix("mixtral-"))
    (directory / "config.json").write_text(json.dumps({**config, "_name_or_path": f"synthetic-{shape}"}))


def _mixtral():
    sys.path.insert(0, str(Path(__file__).parent))
    import masks_mixtral

    return masks_mixtral


def peak_rss_bytes() -> int:
    """This process's peak RSS since exec (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def targeted(directory: Path) -> tuple:
    """(checkpoint, entries of the tensors `masks compute` targets by default, in reading order)."""
    from modelzoo_ext.hf_checkpoint import HFCheckpoint
    from modelzoo_ext.masks.targets import TargetRule

    checkpoint = HFCheckpoint(directory)
    return checkpoint, checkpoint.entries([n for n in checkpoint.keys() if TargetRule().matches(n)])  # noqa: SIM118


def stage_seconds(directory: Path, sparsity: float) -> dict[str, float]:
    """CPU seconds of each step of layer-scope magnitude masks, one thread, warm cache: what bounds
    the rows above (the same functions `compute_masks` runs on its workers)."""
    import contextlib

    import numpy as np

    from modelzoo_ext.masks import bracket, checksum, select
    from modelzoo_ext.masks.format import PackedMask
    from modelzoo_ext.masks.scores import Weight, magnitude_keys, require_finite
    from modelzoo_ext.masks.stream import local_buffer

    checkpoint, entries = targeted(directory)
    seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def step(name: str):
        started = time.thread_time()
        yield
        seconds[name] = seconds.get(name, 0.0) + time.thread_time() - started

    for entry in entries:
        with step("read (copy from page cache)"):
            raw = checkpoint.read(entry, local_buffer("raw", entry.nbytes, np.uint8))
        with step("checksum (BLAKE3)"):
            checksum.array_checksum(raw)
        weight = Weight.from_raw(entry, raw)
        with step("keys"):
            keys = magnitude_keys(weight, local_buffer("keys", entry.numel, np.int16))
        with step("inf/nan check"):
            require_finite(entry.name, weight, "", keys)
        with step("counts (threshold)"):
            kept = [select.kept_count(keys.size, sparsity)]
            (produce,), _ = bracket.tensor_masks(keys, kept, step=bracket.sample_step(keys.size))
        with step("mask (ties)"):
            mask = produce()
        with step("pack + count + mask checksum"):
            PackedMask.of(mask.reshape(weight.shape))
    return seconds


def run_in_process(row: str, directory: Path, out: Path, sparsity: float) -> dict:
    """One in-process row, timed after its imports (a fresh child process runs this)."""
    from modelzoo_ext.masks import checksum
    from modelzoo_ext.masks.compute import MaskRequest, compute_masks
    from modelzoo_ext.masks.stream import pipeline

    checkpoint, entries = targeted(directory)
    budget = max(64 << 20, 2 * max(e.nbytes for e in entries))
    started, cpu = time.perf_counter(), os.times()
    file_bytes = 0
    if row in ("read", "checksum"):
        work = (lambda e, raw: checksum.array_checksum(raw)) if row == "checksum" else (lambda e, raw: None)
        for _ in pipeline(checkpoint.read, entries, work, workers=2, budget=budget):
            pass
    else:
        request = MaskRequest(method="magnitude", scope=row, sparsities=(sparsity,))
        compute_masks(directory, request, out, plot=False)
        file_bytes = out.stat().st_size
    seconds, cpu_after = time.perf_counter() - started, os.times()
    return {
        "seconds": seconds,
        "cpu_seconds": (cpu_after.user - cpu.user) + (cpu_after.system - cpu.system),
        "peak_rss_bytes": peak_rss_bytes(),
        "file_bytes": file_bytes,
    }


def timed_process(command: list[str], env: dict | None = None) -> dict:
    """Run a command to completion (in the repository root): wall seconds, user+sys seconds and
    peak RSS (wait4)."""
    with tempfile.TemporaryFile() as stderr:
        started = time.perf_counter()
        process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=stderr, env={**os.environ, **(env or {})}, cwd=REPO
        )
        _, status, usage = os.wait4(process.pid, 0)  # this child's own rusage
        seconds = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0:
            stderr.seek(0)
            raise RuntimeError(
                f"{command} exited with {process.returncode}: {stderr.read().decode()[-2000:]}"
            )
    return {
        "seconds": seconds,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "peak_rss_bytes": usage.ru_maxrss * 1024,
    }


def evict_from_page_cache(directory: Path) -> None:
    """Drop this checkpoint's pages from the OS page cache (other files untouched)."""
    for path in directory.glob("*.safetensors"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def child_env() -> dict:
    return {
        "TQDM_DISABLE": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }


def cli_command(directory: Path, out: Path, scope: str, sparsity: float) -> list[str]:
    return [sys.executable, "-m", "modelzoo_ext.cli", "masks", "compute", "--model", str(directory),
            "--method", "magnitude", "--scope", scope, "--sparsity", str(sparsity), "--out", str(out), "--no-plot"]  # fmt: skip


def run_row(row: str, directory: Path, workdir: Path, sparsity: float, cold: bool) -> dict:
    """One row in a fresh process; `cold`: the checkpoint's pages are evicted first."""
    if cold:
        evict_from_page_cache(directory)
    out = workdir / f"{row.replace(' ', '_')}.safetensors"
    if row == "cat":
        shards = sorted(str(p) for p in directory.glob("*.safetensors"))
        return {**timed_process(["sh", "-c", 'cat "$@" > /dev/null', "cat", *shards]), "file_bytes": 0}
    if row in CLI:
        result = timed_process(cli_command(directory, out, row.split()[1], sparsity), child_env())
        return {**result, "file_bytes": out.stat().st_size}
    command = [sys.executable, __file__, "--worker", row, "--dir", str(directory)]
    command += ["--sparsity", str(sparsity), "--out", str(out)]
    result = subprocess.run(
        command, check=True, capture_output=True, text=True, env={**os.environ, **child_env()}
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def checksum_rates(nbytes: int = 1 << 26) -> dict[str, float]:
    """GB/s of each checksum candidate on one core, in memory (best of 5 on 64 MiB)."""
    import hashlib

    import blake3
    import numpy as np

    data = np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8)
    candidates = {"sha256": hashlib.sha256, "blake3": blake3.blake3}
    try:
        import xxhash

        candidates["xxh3-128"] = xxhash.xxh3_128
    except ImportError:
        pass
    rates = {}
    for name, hasher in candidates.items():
        best = float("inf")
        for _ in range(5):
            started = time.perf_counter()
            hasher(data).hexdigest()
            best = min(best, time.perf_counter() - started)
        rates[name] = round(nbytes / best / 1e9, 2)
    return rates


def median_run(results: list[dict]) -> dict:
    """The run with the median wall time (its cpu time), and the highest peak RSS of all runs."""
    ordered = sorted(results, key=lambda r: r["seconds"])
    middle = ordered[(len(ordered) - 1) // 2]
    spread = f"{ordered[0]['seconds']:.2f}-{ordered[-1]['seconds']:.2f}"
    return {**middle, "peak_rss_bytes": max(r["peak_rss_bytes"] for r in results), "spread": spread}


def free_cores() -> float:
    """About how many cores a compute-bound job gets now: one job's time over two parallel
    jobs' time, times two (each timing the best of 2), at most the machine's cores."""
    code = "import math; sum(math.sqrt(i) for i in range(2000000))"

    def run(n: int) -> float:
        best = float("inf")
        for _ in range(2):
            started = time.perf_counter()
            for p in [subprocess.Popen([sys.executable, "-c", code]) for _ in range(n)]:
                p.wait()
            best = min(best, time.perf_counter() - started)
        return best

    return round(min(2 * run(1) / run(2), os.cpu_count() or 1), 1)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--shape", choices=[s for s in SHAPES if s != "tiny1"] + list(MIXTRAL_SHAPES), default="1.1b"
    )
    parser.add_argument("--shard-gb", type=float, default=1.0, help="approximate shard size (default 1 GB)")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    parser.add_argument("--cache", choices=("warm", "cold", "both"), default="both")
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs of every row; the median is shown (default 3)"
    )
    parser.add_argument("--workdir", help="where to write the checkpoints (default: a temporary directory)")
    parser.add_argument(
        "--worker", choices=IN_PROCESS + ("bytes", "hashes", "stages"), help=argparse.SUPPRESS
    )
    parser.add_argument("--write", choices=list(SHAPES) + list(MIXTRAL_SHAPES), help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "stages":
        print(json.dumps(stage_seconds(Path(args.dir), args.sparsity)))
        return
    if args.worker == "hashes":
        print(json.dumps(checksum_rates()))
        return
    if args.worker == "bytes":
        print(sum(e.nbytes for e in targeted(Path(args.dir))[1]))
        return
    if args.worker:
        print(json.dumps(run_in_process(args.worker, Path(args.dir), Path(args.out), args.sparsity)))
        return
    if args.write:
        write_checkpoint(Path(args.dir), args.write, int(args.shard_gb * 1e9))
        return

    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    caches = ("cold", "warm") if args.cache == "both" else (args.cache,)
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="bench_masks_") as tmp:
        tmp = Path(tmp)
        directories = {}
        for shape in (args.shape, "tiny1"):
            directories[shape] = tmp / shape
            directories[shape].mkdir()
            t0 = time.perf_counter()
            command = [sys.executable, __file__, "--write", shape, "--dir", str(directories[shape])]
            subprocess.run(
                command + ["--shard-gb", str(args.shard_gb)], check=True, env={**os.environ, **child_env()}
            )
            print(f"wrote synthetic {shape} checkpoint in {time.perf_counter() - t0:.0f} s", flush=True)
        directory = directories[args.shape]
        shard_sizes = [p.stat().st_size for p in directory.glob("*.safetensors")]
        weight_bytes = _targeted_bytes(directory)
        cores = free_cores()
        hashes = json.loads(
            subprocess.run(
                [sys.executable, __file__, "--worker", "hashes"],
                check=True,
                capture_output=True,
                text=True,
                env={**os.environ, **child_env()},
            ).stdout  # fmt: skip
        )
        runs: dict[tuple[str, str], list[dict]] = {}
        for repeat in range(args.repeat):  # rounds over all rows: a busy spell hits one run of each
            for cache in caches:
                if cache == "warm":
                    run_row("cat", directory, tmp, args.sparsity, cold=False)  # untimed: fill the page cache
                for row in args.rows:
                    result = run_row(row, directory, tmp, args.sparsity, cold=cache == "cold")
                    runs.setdefault((row, cache), []).append(result)
                    print(
                        f"  {row} ({cache}, run {repeat + 1}): {result['seconds']:.2f} s",
                        file=sys.stderr,
                        flush=True,
                    )
        rows = {key: median_run(results) for key, results in runs.items()}
        command = [sys.executable, __file__, "--worker", "stages", "--dir", str(directory)]
        command += ["--sparsity", str(args.sparsity)]
        run_row("cat", directory, tmp, args.sparsity, cold=False)  # warm again for the stage timings
        stages = json.loads(
            subprocess.run(
                command, check=True, capture_output=True, text=True, env={**os.environ, **child_env()}
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        tiny_out = tmp / "tiny.safetensors"
        startups = [
            timed_process(cli_command(directories["tiny1"], tiny_out, "layer", args.sparsity), child_env())
            for _ in range(max(3, args.repeat))
        ]
    startup = statistics.median(r["seconds"] for r in startups)
    report(args, rows, startups, startup, weight_bytes, shard_sizes, cores)
    total = sum(stages.values())
    print(
        f"\nwhat bounds layer scope: CPU seconds per step, one thread, warm ({total:.2f} s = "
        f"{total / (weight_bytes / 1e9):.2f} core-s per GB; on 2 free cores at best {2 * weight_bytes / 1e9 / total:.2f} GB/s):"
    )
    for name, seconds in sorted(stages.items(), key=lambda item: -item[1]):
        print(f"  {name:<32} {seconds:6.2f} s  {seconds / total:4.0%}")
    print("\nchecksums on one core, in memory (GB/s): " + ", ".join(f"{k} {v}" for k, v in hashes.items()))


def _targeted_bytes(directory: Path) -> int:
    """Bytes of the targeted tensors (counted in a child: the parent stays free of numpy)."""
    command = [sys.executable, __file__, "--worker", "bytes", "--dir", str(directory)]
    result = subprocess.run(
        command, check=True, capture_output=True, text=True, env={**os.environ, **child_env()}
    )
    return int(result.stdout.strip().splitlines()[-1])


def report(args, rows, startups, startup, weight_bytes, shard_sizes, cores) -> None:
    """The table and the issue's targets, all from this run's rows."""
    numel = weight_bytes // 2
    print(
        f"\nsynthetic {args.shape} bf16 checkpoint: {len(shard_sizes)} shards, largest {max(shard_sizes) / 1e9:.2f} GB; "
        f"targeted {numel / 1e9:.3f} G weights ({weight_bytes / 1e9:.2f} GB), sparsity {args.sparsity}; "
        f"{os.cpu_count()} cores, {cores} free for compute at the start of the run"
    )
    header = (
        f"{'row':<11} {'cache':<5} {'seconds':>8} {'(range)':>11} {'GB/s':>6} {'x read':>6} {'cpu s':>6} "
        f"{'peak RSS GB':>11} {'file MB':>8} {'file/(n/8)':>10}"
    )
    print(header)
    print("-" * len(header))
    for (row, cache), r in rows.items():
        read = rows.get(("read", cache))
        ratio = f"{read['seconds'] / r['seconds']:.2f}" if read else "-"
        file_mb = f"{r['file_bytes'] / 1e6:.1f}" if r["file_bytes"] else "-"
        file_ratio = f"{r['file_bytes'] / (numel / 8):.4f}" if r["file_bytes"] else "-"
        print(
            f"{row:<11} {cache:<5} {r['seconds']:>8.2f} {r['spread']:>11} {weight_bytes / r['seconds'] / 1e9:>6.2f} {ratio:>6} "
            f"{r['cpu_seconds']:>6.2f} {r['peak_rss_bytes'] / 1e9:>11.2f} {file_mb:>8} {file_ratio:>10}"
        )
    times = ", ".join(f"{r['seconds']:.2f}" for r in startups)
    print(
        f"{'startup':<11} {'warm':<5} {startup:>8.2f}  (`masks compute` on a one-layer tiny model, median of {times} s)"
    )
    print("\ntargets (issue 15):")
    for text, ok, value in targets(rows, startup, weight_bytes, shard_sizes, numel):
        print(f"  {'MET    ' if ok else 'NOT MET'} {text}: {value}")


def targets(rows, startup, weight_bytes, shard_sizes, numel) -> list[tuple[str, bool, str]]:
    """(target, met, measured) for each target whose rows this run has."""
    checks = []
    get = rows.get
    if get(("read", "cold")) and get(("cli layer", "cold")):
        work = get(("cli layer", "cold"))["seconds"] - startup
        ratio = get(("read", "cold"))["seconds"] / work
        checks.append(("cold `masks compute` layer (start-up subtracted) >= 0.8 x cold read", ratio >= 0.8,
                       f"{ratio:.2f} x ({work:.2f} s vs read {get(('read', 'cold'))['seconds']:.2f} s)"))  # fmt: skip
    if get(("cli global", "cold")) and get(("cli layer", "cold")):
        ratio = (get(("cli global", "cold"))["seconds"] - startup) / (
            get(("cli layer", "cold"))["seconds"] - startup
        )
        checks.append(
            (
                "cold `masks compute` global <= 1.2 x layer (start-up subtracted)",
                ratio <= 1.2,
                f"{ratio:.2f} x",
            )
        )
    checks.append(
        ("start-up of `masks compute` on a one-layer model <= 1.5 s", startup <= 1.5, f"{startup:.2f} s")
    )
    if get(("layer", "warm")):
        gbps = weight_bytes / get(("layer", "warm"))["seconds"] / 1e9
        checks.append(("warm layer scope >= 1.5 GB/s", gbps >= 1.5, f"{gbps:.2f} GB/s"))
    masks_rows = [r for (row, _), r in rows.items() if row not in ("cat", "read", "checksum")]
    if masks_rows:
        peak, limit = max(r["peak_rss_bytes"] for r in masks_rows), max(shard_sizes) + 1e9
        checks.append(
            ("peak RSS <= largest shard + 1 GB", peak <= limit, f"{peak / 1e9:.2f} vs {limit / 1e9:.2f} GB")
        )
        size = max(r["file_bytes"] for r in masks_rows)
        checks.append(("file <= 1.02 x numel/8", size <= 1.02 * numel / 8, f"{size / (numel / 8):.4f}"))
    return checks


if __name__ == "__main__":
    main()
