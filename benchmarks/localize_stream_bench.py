"""Layer-streaming localization benchmark: in memory vs accelerate's disk offload vs layer streaming.

Builds a synthetic checkpoint with the layer shapes of Llama-2-7B (hidden 4096, MLP
11008, 32 heads of 128; random bfloat16 weights; SmolLM2's tokenizer and vocabulary
size) and ``--layers`` decoder layers, in a temporary folder, then localizes the
first ``--pairs`` COPA pairs (sites head and mlp), each method in its own process:

  (a) `aufold localize` with the model in memory;
  (b) the same localization on the model loaded with `device_map="auto"`, a CPU
      memory budget of ``--budget`` (default: the embeddings, the LM head and one
      layer) and the rest offloaded to disk (accelerate);
  (c) `aufold localize --layer-streaming`;
  (d) (c) again with twice the layers, to show that its peak memory does not grow
      with depth (skip with ``--no-deep``).

Reported: wall time, peak resident memory (the kernel's ru_maxrss of each process)
and bytes read from storage (ru_inblock), the agreement of the counts of (b) and (c)
with (a), and from (c)'s time per layer an estimate for Llama-2-70B. Targets: (c)
peak RSS <= largest layer + hidden states + 1 GB; (c) <= 1.3x (a)'s time; (c) >= 3x
faster than (b).

A model larger than memory cannot stay in the page cache, so by default every run
reads cold: the checkpoint is evicted from the page cache before each run, (b)'s
offloaded files before each of its layers runs, and (c)'s shards before each layer
loads (``posix_fadvise(DONTNEED)``). ``--warm`` skips that (this machine's RAM then
caches everything and the disk is never read).
The temporary folder is removed at the end, also on an error or Ctrl-C.

    python benchmarks/localize_stream_bench.py                     # 8 layers, 200 pairs
    python benchmarks/localize_stream_bench.py --hidden 512 --pairs 40 --no-deep  # quick check
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from fold_bench import timed  # a child process's wall time and peak RSS

# Like fold_bench.py, this process imports neither torch nor aufold: a child's peak RSS
# starts from its parent's size at fork, so the parent stays small.

SITES = ("head", "mlp")
SHARD_BYTES = 5_000_000_000
VOCAB = 49152  # SmolLM2's tokenizer
GB = 2**30
# Llama-2-70B: 80 layers, hidden 8192, MLP 28672, 64 query heads and 8 key-value heads of 128.
LLAMA2_70B = {"layers": 80, "hidden": 8192, "intermediate": 28672, "kv_width": 1024}


def layer_bytes(hidden: int, intermediate: int, kv_width: int | None = None) -> int:
    """bfloat16 bytes of one Llama decoder layer's weights."""
    kv = hidden if kv_width is None else kv_width
    return 2 * (2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * intermediate + 2 * hidden)


def evict(folder: Path) -> None:
    """Drop the folder's files from the page cache, so that their next read goes to disk."""
    for path in folder.rglob("*"):
        if path.is_file():
            descriptor = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(descriptor)


def worker(task: str, folder: Path, args: argparse.Namespace) -> None:
    """The parts that need torch, in child processes."""
    if task == "setup":
        from fold_bench import Shape, write_checkpoint

        from aufold.modeling import load_tokenizer, resolve_source, smollm2_gguf_path

        shape = Shape(args.hidden, args.intermediate, int(folder.name.split("-")[-1]),
                      args.head_dim, VOCAB)
        write_checkpoint(folder, shape, SHARD_BYTES)
        load_tokenizer(resolve_source(smollm2_gguf_path())).save_pretrained(folder)
        print(json.dumps({"bytes": shape.nbytes()}))
    elif task == "offload":
        import torch
        from transformers import AutoModelForCausalLM

        from aufold.modeling import load_tokenizer, resolve_source
        from aufold.tasks import task_pairs
        from aufold.localize import localize

        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.bfloat16, device_map="auto", max_memory={"cpu": args.budget},
            offload_folder=str(folder.parent / "offload"))
        placement = list(model.hf_device_map.values())
        print(f"device map: {placement.count('disk')} of {len(placement)} modules on disk", flush=True)
        if not args.warm:  # every offloaded layer read from disk, as when memory cannot cache it

            def uncached(*_: object) -> None:
                # accelerate reads offloaded weights from its offload folder or, for tensors
                # stored as they are, straight from the checkpoint's shards.
                evict(folder.parent / "offload")
                evict(folder)

            for layer in model.model.layers:
                layer.register_forward_pre_hook(uncached)
        tokenizer = load_tokenizer(resolve_source(str(folder)))
        pairs = task_pairs("copa", None, size=args.pairs)
        localize(model, tokenizer, pairs, SITES, progress=False).save(folder.parent / "plan-b")
    elif task == "stream":
        import cli
        from aufold.layerwise.skeleton import LayerwiseModel

        if not args.warm:  # each layer's shards read from disk
            load = LayerwiseModel._load

            def cold_load(self: LayerwiseModel, names: list[str]) -> None:
                evict(self.checkpoint.folder)
                load(self, names)

            LayerwiseModel._load = cold_load  # type: ignore[method-assign]
        cli.main(args.cli, standalone_mode=True)
    elif task == "compare":
        from aufold.plan import Plan

        plans = {key: Plan.load(folder.parent / f"plan-{key}")
                 for key in ("a", "b", "c") if (folder.parent / f"plan-{key}").exists()}
        reference = plans["a"]
        top = {(u.site, u.layer, u.unit) for u in reference.ranking(k=100)}
        result = {}
        for key, plan in plans.items():
            differ, largest = 0, 0
            for site in reference.sites:
                for mine, theirs in ((plan.counts[site].positive, reference.counts[site].positive),
                                     (plan.counts[site].negative, reference.counts[site].negative)):
                    delta = (mine - theirs).abs()
                    differ += int((delta > 0).sum())
                    largest = max(largest, int(delta.max()))
            common = len(top & {(u.site, u.layer, u.unit) for u in plan.ranking(k=100)})
            result[key] = {"differ": differ, "largest": largest, "common": common}
        print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=None, help="default: 2.6875 x hidden")
    parser.add_argument("--budget", default=None,
                        help="(b)'s CPU memory budget (default: the embeddings, the LM head and "
                             "one layer)")
    parser.add_argument("--warm", action="store_true",
                        help="let the page cache keep the weights (no cold reads)")
    parser.add_argument("--no-deep", action="store_true", help="skip (d), twice the layers")
    parser.add_argument("--tmp", default=None, help="parent of the temporary folder")
    parser.add_argument("--worker", nargs=2, metavar=("TASK", "FOLDER"), help=argparse.SUPPRESS)
    parser.add_argument("cli", nargs="*", help=argparse.SUPPRESS)  # the stream worker's command
    args = parser.parse_args()
    args.intermediate = args.intermediate or round(args.hidden * 2.6875 / 64) * 64
    args.head_dim = 128 if args.hidden >= 1024 else 64
    if args.worker:
        worker(args.worker[0], Path(args.worker[1]), args)
        return
    tmp = Path(tempfile.mkdtemp(prefix="aufold-localize-stream-", dir=args.tmp))
    for number in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(number, _interrupt)
    try:
        run_benchmark(tmp, args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _interrupt(_signal: int, _frame: object) -> None:
    raise KeyboardInterrupt


def run_benchmark(tmp: Path, args: argparse.Namespace) -> None:
    me = [sys.executable, str(Path(__file__).resolve()), "--hidden", str(args.hidden),
          "--intermediate", str(args.intermediate), "--pairs", str(args.pairs),
          *(["--warm"] if args.warm else [])]
    log = tmp / "log.txt"
    model = tmp / f"model-{args.layers}"
    setup = json.loads(timed("setup", [*me, "--worker", "setup", str(model)], log).output.splitlines()[-1])
    per_layer = layer_bytes(args.hidden, args.intermediate)
    # Room for the embeddings, the LM head and one layer: accelerate offloads the rest.
    embeddings = 2 * VOCAB * args.hidden
    budget = args.budget or f"{(2 * embeddings + per_layer) * 21 // 20 // 2**20}MiB"
    print(f"checkpoint: {setup['bytes'] / GB:.2f} GiB bfloat16, {args.layers} layers of "
          f"{per_layer / GB:.2f} GiB (hidden {args.hidden}, MLP {args.intermediate}), vocab {VOCAB}; "
          f"{args.pairs} COPA pairs, sites {', '.join(SITES)}; {os.cpu_count()} CPU cores")
    localize = ["localize", "--task", "copa", "--limit", str(args.pairs),
                *(f"--site={site}" for site in SITES), "--dtype", "bfloat16"]

    def cold(folder: Path) -> Path:
        if not args.warm:
            os.sync()
            evict(folder)
        return folder

    runs = {
        "a": timed("(a) in memory", [sys.executable, str(REPO / "cli.py"), *localize,
                                     str(cold(model)), "--out", str(tmp / "plan-a")], log),
        "b": timed(f"(b) device_map=auto, {budget} CPU + disk",
                   [*me, "--budget", budget, "--worker", "offload", str(cold(model))], log),
        "c": timed("(c) --layer-streaming",
                   [*me, "--worker", "stream", str(cold(model)), "--", *localize, str(model),
                    "--out", str(tmp / "plan-c"), "--layer-streaming"], log),
    }
    placement = re.search(r"device map: (.*)", runs["b"].output)
    found = re.search(r"\(([\d.]+) (GB|MB)\) in memory", runs["c"].output)
    assert found, runs["c"].output
    hidden_gb = float(found.group(1)) / (1 if found.group(2) == "GB" else 1024)
    agreement = json.loads(timed("compare", [*me, "--worker", "compare", str(model)], log)
                           .output.splitlines()[-1])
    if not args.no_deep:
        shutil.rmtree(tmp / "offload", ignore_errors=True)
        deep = tmp / f"model-{2 * args.layers}"
        timed("setup", [*me, "--worker", "setup", str(deep)], log)
        shutil.rmtree(model)
        runs["d"] = timed(f"(d) --layer-streaming, {2 * args.layers} layers",
                          [*me, "--worker", "stream", str(cold(deep)), "--", *localize, str(deep),
                           "--out", str(tmp / "plan-d"), "--layer-streaming"], log)

    print(f"(b) device map: {placement.group(1) if placement else '?'}; reads "
          f"{'cold (page cache evicted)' if not args.warm else 'warm (page cache kept)'}")
    print(f"\n{'run':<40} {'seconds':>8} {'x (a)':>6} {'peak RSS':>10} {'disk read':>10}  "
          f"agreement with (a)")
    for key, run in runs.items():
        agree = agreement.get(key)
        text = (f"{agree['common']}/100 top units in common, {agree['differ']} counters differ "
                f"(largest {agree['largest']})" if agree else "")
        print(f"{run.label:<40} {run.seconds:>8.1f} {run.seconds / runs['a'].seconds:>6.2f} "
              f"{run.peak_rss / GB:>6.2f} GiB {run.read_bytes / GB:>6.2f} GiB  {text}")
    a, b, c = runs["a"], runs["b"], runs["c"]
    limit = per_layer + hidden_gb * GB + GB
    peak = max(run.peak_rss for key, run in runs.items() if key in "cd")
    print(f"\ntargets: (c) peak RSS {peak / GB:.2f} GiB <= largest layer + hidden states + 1 GiB = "
          f"{limit / GB:.2f} GiB: {'ok' if peak <= limit else 'MISSED'}; "
          f"(c) {c.seconds / a.seconds:.2f}x (a)'s time (<= 1.3x): "
          f"{'ok' if c.seconds <= 1.3 * a.seconds else 'MISSED'}; "
          f"(c) {b.seconds / c.seconds:.2f}x faster than (b) (>= 3x): "
          f"{'ok' if b.seconds >= 3 * c.seconds else 'MISSED'}")
    if c.read_bytes:
        print(f"disk reads: (b) {b.read_bytes / GB:.1f} GiB, (c) {c.read_bytes / GB:.1f} GiB "
              f"({b.read_bytes / c.read_bytes:.1f}x): (b) reads its offloaded layers once per "
              f"batch, (c) every layer once; where reading, not computing, sets the time (a GPU, "
              f"a slower disk, more batches), that is the ratio (b)/(c) tends to")
    seconds_per_layer = (runs["d"].seconds - c.seconds) / args.layers if "d" in runs else (
        c.seconds / args.layers)
    ratio = layer_bytes(LLAMA2_70B["hidden"], LLAMA2_70B["intermediate"],
                        LLAMA2_70B["kv_width"]) / per_layer
    big_layer = layer_bytes(LLAMA2_70B["hidden"], LLAMA2_70B["intermediate"], LLAMA2_70B["kv_width"])
    estimate = seconds_per_layer * ratio * LLAMA2_70B["layers"]
    print(f"\nper layer: {seconds_per_layer:.1f} s on this machine"
          + (" (from the difference of (d) and (c))" if "d" in runs else " ((c) / layers)")
          + f". Llama-2-70B's layers are {ratio:.2f}x the work, {LLAMA2_70B['layers']} of them: about "
          f"{estimate / 60:.0f} min for these {args.pairs} pairs here (an estimate, not measured), "
          f"in {big_layer / GB:.2f} GiB for the largest layer + "
          f"{hidden_gb * LLAMA2_70B['hidden'] / args.hidden:.2f} GiB of hidden states + 1 GiB.")


if __name__ == "__main__":
    main()
