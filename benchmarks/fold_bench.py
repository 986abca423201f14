"""Streaming fold benchmark: `aufold export` on a sharded checkpoint against `cp -r` of it.

Builds a synthetic checkpoint with the shapes of Llama-2-7B (random bfloat16
weights, about 13.5 GB in 5 GB shards) in a temporary folder, then times, one
after the other in this one run:

  (a) cp -r of the checkpoint folder;
  (b) `aufold export` (the streaming fold) with 100 units spread over 40 tensors
      (o_proj and down_proj of 20 layers spread over the depth);
  (c) `aufold export --link-unchanged` with the 100 units in the last 12 layers,
      so that the first shard holds no edit and is hard-linked.

Each runs as its own process; its wall time and peak resident memory (the
kernel's ru_maxrss of that process) are reported, with time ratios to cp -r.
Targets: (b) <= 1.2x cp, (c) < 1x cp, peak RSS <= largest tensor + 500 MB.

`--size 200MB` (any size) scales the model down (same 32 layers, narrower) and
the shards with it, for a quick correctness run: `--check` then also compares
the output of (b) bitwise with the in-memory fold (transformers + fold_model).
The temporary folder is removed at the end, also on an error or Ctrl-C.

    python benchmarks/fold_bench.py                  # the full 13.5 GB run
    python benchmarks/fold_bench.py --size 200MB --check
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# This process only starts the others and imports neither torch nor aufold: a child's
# peak RSS (ru_maxrss) starts from its parent's size at fork, so the parent stays small.
# The checkpoint, the plans and the bitwise check are made by worker processes.

FULL_SIZE = "13.5GB"
FULL_SHARD = 5_000_000_000
UNITS = 100
ALPHA = 2.0
RSS_ALLOWANCE = 500 * 2**20  # "largest tensor + 500 MB"
POOL_VALUES = 1 << 25  # 64 MB of random bfloat16 values, reused at random offsets


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    head_dim: int
    vocab: int

    def tensors(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        """Names and shapes in the order transformers saves a LlamaForCausalLM."""
        h, i = self.hidden, self.intermediate
        yield "model.embed_tokens.weight", (self.vocab, h)
        for layer in range(self.layers):
            base = f"model.layers.{layer}"
            yield f"{base}.self_attn.q_proj.weight", (h, h)
            yield f"{base}.self_attn.k_proj.weight", (h, h)
            yield f"{base}.self_attn.v_proj.weight", (h, h)
            yield f"{base}.self_attn.o_proj.weight", (h, h)
            yield f"{base}.mlp.gate_proj.weight", (i, h)
            yield f"{base}.mlp.up_proj.weight", (i, h)
            yield f"{base}.mlp.down_proj.weight", (h, i)
            yield f"{base}.input_layernorm.weight", (h,)
            yield f"{base}.post_attention_layernorm.weight", (h,)
        yield "model.norm.weight", (h,)
        yield "lm_head.weight", (self.vocab, h)

    def nbytes(self) -> int:
        total = 0
        for _, shape in self.tensors():
            count = 1
            for dim in shape:
                count *= dim
            total += 2 * count
        return total


LLAMA2_7B = Shape(hidden=4096, intermediate=11008, layers=32, head_dim=128, vocab=32000)


def scaled_shape(size: int) -> Shape:
    """Llama-2-7B's proportions (32 layers, MLP 2.6875x), as wide as fits ``size`` bytes."""
    vocab = 32000 if size >= 2 * 10**9 else 8000
    best = Shape(64, 192, 32, 64, vocab)
    for hidden in range(64, 8192, 64):
        intermediate = max(64, round(hidden * 2.6875 / 64) * 64)
        shape = Shape(hidden, intermediate, 32, 128 if hidden >= 1024 else 64, vocab)
        if shape.nbytes() > size:
            break
        best = shape
    return best


def parse_size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    text = text.strip().upper()
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * factor)
    return int(text)


def write_checkpoint(folder: Path, shape: Shape, shard_bytes: int, seed: int = 0) -> None:
    """Random bfloat16 shards, an index, and a config that transformers loads."""
    import torch
    from transformers import LlamaConfig

    from aufold.checkpoint import INDEX_FILE, safetensors_writer

    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    pool = (torch.randn(POOL_VALUES, generator=generator) * 0.02).to(torch.bfloat16)
    pool_bytes = memoryview(pool.view(torch.uint8).numpy())
    rng = random.Random(seed)

    shards: list[list[tuple[str, tuple[int, ...], int]]] = [[]]
    filled = 0
    for name, dims in shape.tensors():
        nbytes = 2
        for dim in dims:
            nbytes *= dim
        if shards[-1] and filled + nbytes > shard_bytes:
            shards.append([])
            filled = 0
        shards[-1].append((name, dims, nbytes))
        filled += nbytes
    weight_map = {}
    for number, tensors in enumerate(shards, start=1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        entries = [(name, "BF16", dims, nbytes) for name, dims, nbytes in tensors]
        with safetensors_writer(folder / file, entries, {"format": "pt"}) as writer:
            for name, _, nbytes in tensors:
                offset = 2 * rng.randrange(POOL_VALUES)
                while nbytes:
                    chunk = pool_bytes[offset: offset + nbytes]
                    writer.write(name, chunk)
                    nbytes -= len(chunk)
                    offset = 0
                weight_map[name] = file
    index = {"metadata": {"total_size": shape.nbytes()}, "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2))
    LlamaConfig(hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                num_hidden_layers=shape.layers, num_attention_heads=shape.hidden // shape.head_dim,
                num_key_value_heads=shape.hidden // shape.head_dim, head_dim=shape.head_dim,
                vocab_size=shape.vocab, tie_word_embeddings=False,
                dtype="bfloat16").save_pretrained(folder)
    (folder / "generation_config.json").write_text('{"bos_token_id": 1, "eos_token_id": 2}\n')


def write_plan(folder: Path, source: Path, shape: Shape, layers: list[int], seed: int) -> Path:
    """A plan whose top 100 units sit in the o_proj and down_proj of ``layers``, round robin."""
    import torch

    from aufold.checkpoint import open_checkpoint
    from aufold.plan import Plan, SiteCounts
    from aufold.streaming import checkpoint_architecture, checkpoint_fingerprint

    checkpoint = open_checkpoint(source)
    config, architecture = checkpoint_architecture(source)
    widths = {"head": shape.hidden, "mlp": shape.intermediate}
    counts = {site: SiteCounts(torch.zeros(shape.layers, width, dtype=torch.long),
                               torch.zeros(shape.layers, width, dtype=torch.long))
              for site, width in widths.items()}
    targets = [(site, layer) for layer in layers for site in widths]
    rng = random.Random(seed)
    used: set[tuple[str, int, int]] = set()
    for rank in range(UNITS):
        site, layer = targets[rank % len(targets)]
        unit = rng.randrange(widths[site])
        while (site, layer, unit) in used:
            unit = rng.randrange(widths[site])
        used.add((site, layer, unit))
        side = counts[site].positive if rank % 2 else counts[site].negative
        side[layer, unit] = 1000 - rank  # distinct scores: these are the top 100
    plan = Plan("synthetic-llama-2-7b", checkpoint_fingerprint(checkpoint, config, architecture),
                1000, counts)
    return plan.save(folder)


@dataclass(frozen=True)
class Run:
    label: str
    seconds: float
    peak_rss: int  # bytes
    output: str
    read_bytes: int = 0  # read from storage, not from the page cache (ru_inblock)


def timed(label: str, command: list[str], log: Path) -> Run:
    """Run a command as a child process; its wall time, its own peak RSS and what it read
    from storage."""
    with log.open("w") as handle:
        start = time.perf_counter()
        child = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
    output = log.read_text()
    if child.returncode != 0:
        raise SystemExit(f"{label} failed ({child.returncode}):\n{output}")
    return Run(label, seconds, usage.ru_maxrss * 1024, output, usage.ru_inblock * 512)


def sync() -> None:
    """Flush dirty pages so a run does not pay for the writes of the one before."""
    os.sync()


def check_bitwise(source: Path, plan_dir: Path, folded: Path) -> bool:
    """The streamed output against transformers' loaded model folded in memory."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from aufold.fold import fold_model
    from aufold.plan import Plan

    model = AutoModelForCausalLM.from_pretrained(source, dtype="auto")
    plan = Plan.load(plan_dir)
    fold_model(model, plan.select(UNITS, ALPHA))
    state = model.state_dict()
    for file in sorted(folded.glob("*.safetensors")):
        with safe_open(file, "pt") as handle:
            for name in handle.keys():
                got, want = handle.get_tensor(name), state[name]
                if not torch.equal(got.view(torch.uint8), want.contiguous().view(torch.uint8)):
                    print(f"  differs: {name}")
                    return False
    return True


def worker(task: str, tmp: Path, shape: Shape, shard_bytes: int) -> None:
    """The parts that need torch, run in a child process; results go to stdout as JSON."""
    source = tmp / "checkpoint"
    if task == "setup":
        from aufold.checkpoint import open_checkpoint

        start = time.perf_counter()
        write_checkpoint(source, shape, shard_bytes)
        seconds = time.perf_counter() - start
        spread = sorted({round(i * (shape.layers - 1) / 19) for i in range(20)})
        last = list(range(shape.layers - 12, shape.layers))
        write_plan(tmp / "plan-spread", source, shape, spread, seed=1)
        write_plan(tmp / "plan-last12", source, shape, last, seed=2)
        checkpoint = open_checkpoint(source)
        print(json.dumps({"shards": len(checkpoint.shards), "seconds": seconds,
                          "largest": checkpoint.largest_tensor_bytes}))
    elif task == "check":
        print(json.dumps({"bitwise": check_bitwise(source, tmp / "plan-spread", tmp / "out")}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default=FULL_SIZE,
                        help=f"checkpoint size; {FULL_SIZE} (default) is Llama-2-7B's exact shapes")
    parser.add_argument("--repeat", type=int, default=1, help="rounds of (a), (b), (c); best time kept")
    parser.add_argument("--check", action="store_true",
                        help="also compare (b) bitwise with the in-memory fold (needs RAM for the model)")
    parser.add_argument("--tmp", default=None, help="parent of the temporary folder (default: $TMPDIR)")
    parser.add_argument("--worker", nargs=2, metavar=("TASK", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    size = parse_size(args.size)
    shape = LLAMA2_7B if args.size == FULL_SIZE else scaled_shape(size)
    shard_bytes = FULL_SHARD
    if args.size != FULL_SIZE:  # shards in the same proportion to the model
        shard_bytes = max(1, int(FULL_SHARD * size / LLAMA2_7B.nbytes()))
    if args.worker:
        worker(args.worker[0], Path(args.worker[1]), shape, shard_bytes)
        return
    tmp = Path(tempfile.mkdtemp(prefix="aufold-fold-bench-", dir=args.tmp))
    # SIGTERM and SIGHUP unwind like Ctrl-C, so the finally below always removes the folder.
    for number in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(number, _interrupt)
    try:
        run_benchmark(tmp, shape, args.size, args.repeat, args.check)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _interrupt(_signal: int, _frame: object) -> None:
    raise KeyboardInterrupt


def run_benchmark(tmp: Path, shape: Shape, size: str, repeat: int, check: bool) -> None:
    free = shutil.disk_usage(tmp).free
    if free < 2.1 * shape.nbytes():
        raise SystemExit(f"needs {2.1 * shape.nbytes() / 1e9:.1f} GB free in {tmp}, has {free / 1e9:.1f}")
    me = [sys.executable, str(Path(__file__).resolve()), "--size", size, "--worker"]
    setup = json.loads(timed("setup", [*me, "setup", str(tmp)], tmp / "log.txt").output.splitlines()[-1])
    largest = setup["largest"]
    print(f"checkpoint: {shape.nbytes() / 1e9:.2f} GB bfloat16 in {setup['shards']} shards; hidden "
          f"{shape.hidden}, MLP {shape.intermediate}, {shape.layers} layers, vocab {shape.vocab}; "
          f"largest tensor {largest / 2**20:.0f} MiB; written in {setup['seconds']:.1f} s")
    source = tmp / "checkpoint"
    # --no-cost: the export's own work is timed, not the KL measurement on neutral text.
    cli = [sys.executable, str(REPO / "cli.py"), "export", str(source), "--k", str(UNITS),
           "--alpha", str(ALPHA), "--no-cost"]
    commands = {
        "a": ("(a) cp -r", ["cp", "-r", str(source), str(tmp / "out")]),
        "b": ("(b) aufold export, 100 units / 40 tensors",
              [*cli, "--plan", str(tmp / "plan-spread"), "--out", str(tmp / "out")]),
        "c": ("(c) aufold export --link-unchanged, last 12 layers",
              [*cli, "--plan", str(tmp / "plan-last12"), "--out", str(tmp / "out"), "--link-unchanged"]),
    }
    best: dict[str, Run] = {}
    bitwise = None
    for _ in range(repeat):
        for key, (label, command) in commands.items():
            sync()
            run = timed(label, command, tmp / "log.txt")
            if key == "b" and check and bitwise is None:
                check_run = timed("check", [*me, "check", str(tmp)], tmp / "log.txt")
                bitwise = json.loads(check_run.output.splitlines()[-1])["bitwise"]
            if key != "a":
                print(f"  {label}: {run.output.strip().splitlines()[0]} ({run.seconds:.2f} s)")
            else:
                print(f"  {label}: {run.seconds:.2f} s")
            shutil.rmtree(tmp / "out")
            if key not in best or run.seconds < best[key].seconds:
                best[key] = run
    sync()
    copy = best["a"].seconds
    limit = largest + RSS_ALLOWANCE
    print(f"\n{'run (best of ' + str(repeat) + ')':<52} {'seconds':>8} {'x cp -r':>8} {'peak RSS':>12}")
    for run in best.values():
        print(f"{run.label:<52} {run.seconds:>8.2f} {run.seconds / copy:>8.2f} "
              f"{run.peak_rss / 2**20:>8.0f} MiB")
    b, c = best["b"], best["c"]
    peak = max(b.peak_rss, c.peak_rss)
    print(f"\ntargets: (b) <= 1.2x cp: {b.seconds / copy:.2f}x "
          f"{'ok' if b.seconds <= 1.2 * copy else 'MISSED'}; "
          f"(c) < 1x cp: {c.seconds / copy:.2f}x {'ok' if c.seconds < copy else 'MISSED'}; "
          f"peak RSS {peak / 2**20:.0f} MiB <= largest tensor + 500 MiB = {limit / 2**20:.0f} MiB: "
          f"{'ok' if peak <= limit else 'MISSED'}")
    if check:
        print(f"bitwise equal to the in-memory fold: {'yes' if bitwise else 'NO'}")
        if not bitwise:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
