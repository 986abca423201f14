"""Tuning benchmark: the prefix-resumed sweep against evaluating every configuration from scratch.

On SmolLM2-135M-Instruct and COPA, in one run, side by side:

  1. localize on the COPA pairs split (or take --plan);
  2. sweep alpha x k on the tune items twice: (a) from scratch, every configuration
     a full forward pass per batch under its hooks; (b) aufold's sweep, one
     unsteered pass per batch that records the hidden states entering each
     configuration's earliest steered layer, every configuration resuming there.
     The items are split into chunks and (a) and (b) alternate chunk by chunk, so
     a change in machine load hits both alike (the CPU time of this process is
     printed beside the wall time: on a shared machine it is the steadier one);
  3. evaluate the chosen configuration on the test items the same two ways.

Prints every configuration's tune accuracy and earliest steered layer, the time
of (b) over (a), and the agreement of the predictions (target: identical). The
saving depends on where the units sit: a configuration starting at layer L of N
skips L/N of the decoder. Timings are never asserted.

    python benchmarks/tune_bench.py                       # head site, a 4 x 3 grid
    python benchmarks/tune_bench.py --paper-grid --site head --site mlp
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from aufold.localize import localize  # noqa: E402
from aufold.modeling import load_model, local_smollm2, num_layers  # noqa: E402
from aufold.plan import Plan  # noqa: E402
from aufold.tasks import Item, load_split, task_pairs  # noqa: E402
from aufold.tune import ALPHA_GRID, K_GRID, Config, Sweep, choose, sweep  # noqa: E402

BENCH_K = (2, 8, 32, 100)
BENCH_ALPHA = (1.0, 10.0, 50.0)


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def side_by_side(model: Any, tokenizer: Any, plan: Plan, items: list[Item], chunk: int,
                 **options: Any) -> tuple[dict[str, float], list[Sweep], list[Sweep]]:
    """Both sweeps over the same chunks of items, alternating; their times and results."""
    times = {"scratch": 0.0, "resumed": 0.0, "scratch_cpu": 0.0, "resumed_cpu": 0.0}
    scratch, resumed = [], []
    for start in range(0, len(items), chunk):
        part = items[start:start + chunk]
        spent = {}
        for name, runs, resume in (("scratch", scratch, False), ("resumed", resumed, True)):
            began, began_cpu = time.perf_counter(), time.process_time()
            runs.append(sweep(model, tokenizer, plan, part, resume=resume, progress=False, **options))
            spent[name] = time.perf_counter() - began
            times[name] += spent[name]
            times[f"{name}_cpu"] += time.process_time() - began_cpu
        print(f"  items {start + 1:>3}-{start + len(part):>3}: from scratch {spent['scratch']:7.2f} s, "
              f"resumed {spent['resumed']:7.2f} s, ratio {spent['resumed'] / spent['scratch']:.3f}",
              flush=True)
    return times, scratch, resumed


def time_line(label: str, times: dict[str, float]) -> str:
    return (f"{label} from scratch {times['scratch']:.2f} s, resumed {times['resumed']:.2f} s; "
            f"resumed/scratch = {times['resumed'] / times['scratch']:.3f} wall time, "
            f"{times['resumed_cpu'] / times['scratch_cpu']:.3f} CPU time of this process")


def agreement(scratch: list[Sweep], resumed: list[Sweep]) -> tuple[int, int, int, int]:
    """(identical item results, items compared, configurations with identical results, configs)."""
    same = total = configs_same = 0
    for config in scratch[0].cells:
        all_same = True
        for a, b in zip(scratch, resumed):
            pairs = list(zip(a.cells[config].items, b.cells[config].items))
            same += sum(x == y for x, y in pairs)
            total += len(pairs)
            all_same &= all(x == y for x, y in pairs)
        configs_same += all_same
    pairs = [(x, y) for a, b in zip(scratch, resumed) for x, y in zip(a.base.items, b.base.items)]
    return same + sum(x == y for x, y in pairs), total + len(pairs), configs_same, len(scratch[0].cells)


def merged_accuracy(parts: list[Sweep], config: Config | None) -> tuple[float, int]:
    results = [p.base if config is None else p.cells[config] for p in parts]
    correct, n = sum(r.correct for r in results), sum(r.n for r in results)
    return correct / n, n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Model (default: SmolLM2-135M-Instruct).")
    parser.add_argument("--plan", default=None, help="Plan folder; default: localize on COPA pairs.")
    parser.add_argument("--pairs-size", type=int, default=None, help="Localize on the first N pairs.")
    parser.add_argument("--site", dest="sites", action="append", default=None)
    parser.add_argument("--paper-grid", action="store_true", help="k and alpha grids of the paper.")
    parser.add_argument("--tune-size", type=int, default=None)
    parser.add_argument("--test-size", type=int, default=None)
    parser.add_argument("--scorer", default="first-token", choices=["first-token", "loglik"])
    parser.add_argument("--chunk", type=int, default=50, help="Items per alternation chunk.")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()

    model_ref = args.model or str(local_smollm2(REPO))
    model, tokenizer, _ = load_model(model_ref, dtype="float32", device=args.device)
    sites = args.sites or ["head"]
    ks, alphas = (K_GRID, ALPHA_GRID) if args.paper_grid else (BENCH_K, BENCH_ALPHA)
    tune_items = load_split("copa", "tune", None, size=args.tune_size, option="--tune-size")
    test_items = load_split("copa", "test", None, size=args.test_size, option="--test-size")
    layers = num_layers(model)
    print(f"tune_bench: {model_ref}, {layers} layers, device "
          f"{model.get_input_embeddings().weight.device}, torch threads {torch.get_num_threads()}")
    print(f"load average before: {load_average()}")

    if args.plan:
        plan = Plan.load(args.plan)
    else:
        pairs = task_pairs("copa", None, size=args.pairs_size)
        began = time.perf_counter()
        plan = localize(model, tokenizer, pairs, sites, progress=False)
        print(f"localized {len(pairs)} COPA pairs over {', '.join(sites)} in "
              f"{time.perf_counter() - began:.1f} s")

    options: dict[str, Any] = dict(sites=sites, ks=ks, alphas=alphas, scorer=args.scorer,
                                   batch_size=args.batch_size)
    n_configs = len(sites) * len(ks) * len(alphas)
    print(f"sweep of {n_configs} configurations ({args.scorer}) on {len(tune_items)} tune items:")
    times, scratch, resumed = side_by_side(model, tokenizer, plan, tune_items, args.chunk, **options)
    same, total, configs_same, configs = agreement(scratch, resumed)
    starts = resumed[0].start_layers
    base_accuracy, n = merged_accuracy(resumed, None)
    print(f"unsteered tune accuracy {base_accuracy:.4f} (n={n})")
    resumed_from = resumed[0].resumed_from
    print(f"{'site':<8}{'k':>5}{'alpha':>7}{'tune acc':>10}{'earliest steered layer':>24}{'resumed from':>14}")
    for config in resumed[0].cells:
        accuracy, _ = merged_accuracy(resumed, config)
        print(f"{config.site:<8}{config.k:>5}{config.alpha:>7g}{accuracy:>10.4f}{starts[config]:>24}"
              f"{resumed_from[config]:>14}")
    skipped = sum(resumed_from.values()) / (len(resumed_from) * layers)
    print(f"earliest steered layers: {sorted(set(starts.values()))}; mean share of the "
          f"{layers} decoder layers skipped per configuration: {skipped:.3f}")
    print(time_line("grid time", times))
    print(f"identical item results (prediction and scorer detail): {same}/{total}; "
          f"configurations identical: {configs_same}/{configs}")

    accuracy = {c: merged_accuracy(resumed, c)[0] for c in resumed[0].cells}
    best = choose(accuracy)
    print(f"chosen on tune: {best.label()} (tune accuracy {accuracy[best]:.4f})")
    print(f"test ({len(test_items)} items), unsteered and the chosen configuration:")
    single = dict(options, sites=[best.site], ks=[best.k], alphas=[best.alpha])
    times, scratch, resumed = side_by_side(model, tokenizer, plan, test_items, args.chunk, **single)
    same, total, _, _ = agreement(scratch, resumed)
    base_accuracy, n = merged_accuracy(scratch, None)
    steered_accuracy, _ = merged_accuracy(scratch, best)
    print(f"test accuracy unsteered {base_accuracy:.4f} -> steered {steered_accuracy:.4f} "
          f"(gain {steered_accuracy - base_accuracy:+.4f}, n={n})")
    print(time_line("test time", times) + f"; identical item results {same}/{total}")
    print(f"load average after: {load_average()}")


if __name__ == "__main__":
    main()
