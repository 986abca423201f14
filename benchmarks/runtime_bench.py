"""Runtime overhead: decode speed of the base model, the exported folded model and hook mode.

On SmolLM2-135M-Instruct, greedy decoding at batch 1 with the KV cache, a fixed
number of new tokens per prompt. Target: folded / base >= 0.98 (the folded model
is the same architecture with other weights); hook mode's overhead is reported
as measured. The variants take turns on each prompt, in a rotating order, and
each ratio to the base is the median of the ratios within a turn, so that a
change in machine load between turns cancels out.

The folded model is written by `aufold export` (the streaming fold) from a plan
of 100 head and mlp units and loaded back from disk like any checkpoint.

    python benchmarks/runtime_bench.py
    python benchmarks/runtime_bench.py --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from aufold.export import export  # noqa: E402
from aufold.modeling import fingerprint, load_model, local_smollm2, site_width  # noqa: E402
from aufold.plan import Plan, SiteCounts  # noqa: E402
from aufold.steer import steer  # noqa: E402
from aufold.verify import DEFAULT_PROMPTS  # noqa: E402

UNITS = 100
ALPHA = 2.0


def random_plan(model, seed: int = 0) -> Plan:  # type: ignore[no-untyped-def]
    generator = torch.Generator().manual_seed(seed)
    layers = model.config.num_hidden_layers
    counts = {}
    for site in ("head", "mlp"):
        shape = (layers, site_width(model, site))
        counts[site] = SiteCounts(torch.randint(0, 100, shape, generator=generator),
                                  torch.randint(0, 100, shape, generator=generator))
    return Plan("runtime-bench", fingerprint(model), 100, counts)


def decode_seconds(model, inputs: list[dict[str, torch.Tensor]],  # type: ignore[no-untyped-def]
                   new_tokens: int) -> float:
    device = model.get_input_embeddings().weight.device
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.inference_mode():
        for encoded in inputs:
            model.generate(**encoded, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           do_sample=False, pad_token_id=model.generation_config.eos_token_id)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a local model folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=8,
                        help="turns per prompt; fewer than 8 left the ratio noisy (about ±2%%) on "
                             "2 CPU cores")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for torch (default 1: on a busy machine, several OpenMP "
                             "threads per decode step mostly wait for each other; 0 keeps torch's "
                             "default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    reference = args.model or local_smollm2(REPO)
    base, tokenizer, _ = load_model(reference, dtype=args.dtype, device=args.device)
    plan = random_plan(base)
    edit = plan.select(UNITS, ALPHA)
    with tempfile.TemporaryDirectory(prefix="aufold-runtime-") as tmp:
        if str(reference).endswith(".gguf"):
            # The streaming fold reads safetensors; a GGUF model is folded in memory instead.
            base.save_pretrained(Path(tmp) / "base")
            tokenizer.save_pretrained(Path(tmp) / "base")
            reference = Path(tmp) / "base"
        export(reference, plan, k=UNITS, alpha=ALPHA, out=Path(tmp) / "folded", cost=False)
        folded, _, _ = load_model(Path(tmp) / "folded", dtype=args.dtype, device=args.device)
    device = base.get_input_embeddings().weight.device
    inputs = [tokenizer(prompt, return_tensors="pt").to(device) for prompt in DEFAULT_PROMPTS]

    def hooked(encoded: dict[str, torch.Tensor]) -> float:
        with steer(base, edit):
            return decode_seconds(base, [encoded], args.new_tokens)

    variants = {
        "base": lambda encoded: decode_seconds(base, [encoded], args.new_tokens),
        "folded (aufold export)": lambda encoded: decode_seconds(folded, [encoded], args.new_tokens),
        f"hook mode ({UNITS} units)": hooked,
    }
    for run in variants.values():  # warm-up, untimed
        run(inputs[0])
    # Paired turns: for every (round, prompt) the three variants decode the same prompt one
    # after the other, in a rotating order; ratios are taken within each turn, so a change
    # in machine load between turns cancels out.
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(args.rounds):
        for prompt_index, encoded in enumerate(inputs):
            shift = (round_index + prompt_index) % len(names)
            for name in names[shift:] + names[:shift]:
                times[name].append(variants[name](encoded))

    turns = args.rounds * len(inputs)
    print(f"model {Path(str(reference)).name}, {args.dtype} on {device} ({torch.get_num_threads()} "
          f"threads); greedy decoding, batch 1, {args.new_tokens} new tokens per turn, {turns} paired "
          f"turns ({args.rounds} rounds x {len(inputs)} prompts)")
    print(f"\n{'variant':<26} {'tokens/s':>9} {'x base':>7}   (tokens/s: median turn; x base: median of "
          f"the per-turn ratios)")
    ratios = {}
    for name in names:
        rate = args.new_tokens / statistics.median(times[name])
        ratios[name] = statistics.median(b / t for b, t in zip(times["base"], times[name]))
        print(f"{name:<26} {rate:>9.1f} {ratios[name]:>7.3f}")
    print(f"\nfolded / base = {ratios['folded (aufold export)']:.3f} (target >= 0.98); "
          f"hook mode / base = {ratios[names[2]]:.3f}")


if __name__ == "__main__":
    main()
