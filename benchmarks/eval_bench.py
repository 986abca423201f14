"""Evaluation benchmark: the batched first-token scorer against a loop of `generate` per item.

On SmolLM2-135M-Instruct and the COPA tune and test items (600 by default), in one
run, side by side:

  (a) the reference: ``model.generate(max_new_tokens=1, do_sample=False)`` on one
      item at a time, the decoded token as the prediction;
  (b) aufold's first-token scorer: left-padded batches, one forward per batch,
      the LM head on the last position only.

The items are split into chunks and the two methods alternate chunk by chunk, so
a change in machine load hits both alike; the CPU time of this process is printed
beside the wall time, since on a shared machine it is the steadier of the two. Prints each method's time, the speed-up
(a)/(b), and how many predictions agree (target: all of them, and >= 1.5x). The
loglik scorer's time and accuracy are printed for reference. Timings are never
asserted.

    python benchmarks/eval_bench.py                    # 600 items on CPU
    python benchmarks/eval_bench.py --limit 100 --device cuda
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from aufold.evaluate import evaluate_items  # noqa: E402
from aufold.modeling import load_model, local_smollm2  # noqa: E402
from aufold.tasks import Item, load_split  # noqa: E402



def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


@torch.inference_mode()
def generate_loop(model: torch.nn.Module, tokenizer: object, items: list[Item]) -> list[str]:
    predictions = []
    device = model.get_input_embeddings().weight.device
    for item in items:
        inputs = tokenizer(item.prompt, return_tensors="pt").to(device)  # type: ignore[operator]
        output = model.generate(**inputs, max_new_tokens=1, do_sample=False,  # type: ignore[operator]
                                pad_token_id=tokenizer.pad_token_id)  # type: ignore[attr-defined]
        new = output[0, inputs["input_ids"].shape[1]:]
        predictions.append(tokenizer.decode(new, skip_special_tokens=True))  # type: ignore[attr-defined]
    return predictions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Model (default: SmolLM2-135M-Instruct).")
    parser.add_argument("--limit", type=int, default=None, help="First N items of each split.")
    parser.add_argument("--chunk", type=int, default=50, help="Items per alternation chunk.")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()

    model_ref = args.model or str(local_smollm2(REPO))
    model, tokenizer, _ = load_model(model_ref, dtype="float32", device=args.device)
    splits = {split: load_split("copa", split, None, size=args.limit) for split in ("tune", "test")}
    items = [item for split_items in splits.values() for item in split_items]
    device = model.get_input_embeddings().weight.device
    print(f"eval_bench: {model_ref} on COPA tune+test ({len(items)} items), device {device}, "
          f"torch threads {torch.get_num_threads()}, {platform.processor() or platform.machine()}")
    print(f"load average before: {load_average()}")

    # Warm-up, untimed: first calls allocate and initialise kernels.
    generate_loop(model, tokenizer, items[:2])
    evaluate_items(model, tokenizer, items[:2], scorer="first-token", progress=False)

    reference: list[str] = []
    batched: list[str] = []
    times = {"loop": 0.0, "batched": 0.0}
    cpu = {"loop": 0.0, "batched": 0.0}
    for start in range(0, len(items), args.chunk):
        chunk = items[start:start + args.chunk]
        began, began_cpu = time.perf_counter(), time.process_time()
        reference += generate_loop(model, tokenizer, chunk)
        loop_s, loop_cpu = time.perf_counter() - began, time.process_time() - began_cpu
        began, began_cpu = time.perf_counter(), time.process_time()
        result = evaluate_items(model, tokenizer, chunk, scorer="first-token",
                                batch_size=args.batch_size, progress=False)
        batched_s, batched_cpu = time.perf_counter() - began, time.process_time() - began_cpu
        batched += result.predictions()
        times["loop"] += loop_s
        times["batched"] += batched_s
        cpu["loop"] += loop_cpu
        cpu["batched"] += batched_cpu
        print(f"  items {start + 1:>3}-{start + len(chunk):>3}: loop {loop_s:7.2f} s, batched "
              f"{batched_s:7.2f} s, ratio {loop_s / batched_s:5.2f}x (CPU time ratio "
              f"{loop_cpu / batched_cpu:5.2f}x)", flush=True)

    agree = sum(a == b for a, b in zip(reference, batched))
    n = len(items)
    print(f"generate loop (one item at a time, max_new_tokens=1): {times['loop']:8.2f} s "
          f"({times['loop'] / n * 1000:.1f} ms/item)")
    print(f"first-token scorer (batches of {args.batch_size}, left padding, head on last position): "
          f"{times['batched']:8.2f} s ({times['batched'] / n * 1000:.1f} ms/item)")
    print(f"speed-up loop/batched: {times['loop'] / times['batched']:.2f}x wall time, "
          f"{cpu['loop'] / cpu['batched']:.2f}x CPU time of this process "
          f"({cpu['loop']:.2f} s / {cpu['batched']:.2f} s)")
    print(f"identical predictions: {agree}/{n}")
    offset = 0
    for split, split_items in splits.items():
        gold = [item.answer.strip().lower() for item in split_items]
        correct = sum(p.strip().lower() == g for p, g in zip(batched[offset:offset + len(gold)], gold))
        print(f"first-token accuracy on {split}: {correct / len(gold):.4f} ({correct}/{len(gold)})")
        offset += len(gold)

    began = time.perf_counter()
    loglik = evaluate_items(model, tokenizer, items, scorer="loglik", batch_size=args.batch_size,
                            progress=False)
    loglik_s = time.perf_counter() - began
    same_choice = sum(p.strip().lower() == q.prediction.strip().lower() for p, q in zip(batched, loglik.items))
    print(f"loglik scorer (batched, one row per item): {loglik_s:8.2f} s, accuracy "
          f"{loglik.accuracy:.4f} on all {n}; same letter as first-token on {same_choice}/{n}")
    print(f"load average after: {load_average()}")


if __name__ == "__main__":
    main()
