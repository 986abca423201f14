"""The embedded default: the whole AUSteer path on SmolLM2-135M-Instruct and a generated task.

The task is two-digit addition, ``"47 + 38 ="`` answered ``" 85"`` (right) or a
near miss such as ``" 84"`` or ``" 95"`` (wrong). aufold writes the items itself
from a fixed seed, so the demo needs no data download and is reproducible. Three
disjoint splits play the roles of the paper's protocol: ``pairs`` to localize,
``tune`` to choose k and alpha, ``test`` to report.
"""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from transformers import PreTrainedTokenizerBase

from aufold.evaluate import evaluate_items
from aufold.evaluate.cost import CostRequest, measure_cost
from aufold.export import base_model_name, export_loaded
from aufold.localize import localize
from aufold.modeling import load_model, resolve_source, smollm2_gguf_path
from aufold.pairs import write_pairs
from aufold.plan import Plan
from aufold.plotting import INSTALL_HINT, matplotlib_available, plot_heatmap, plot_unit_scores
from aufold.safety.outputs import atomic_folder, claim_output
from aufold.steer import steer
from aufold.tasks import Item
from aufold.tasks.contrast import choice_pairs
from aufold.verify import VerifyReport, verify_loaded

if TYPE_CHECKING:
    from transformers import PreTrainedModel

SPLIT_SIZES = {"pairs": 160, "tune": 100, "test": 200}
DEMO_SITES = ("head", "mlp")
UNIT_MAP = "unit-map.png"
TUNE_HEATMAP = "tune-heatmap.png"
K_GRID = (8, 32, 100)
ALPHA_GRID = (1.0, 5.0, 10.0, 20.0)
_SEED = 20260204


def arithmetic_items(split: str) -> list[Item]:
    """Items of one split; the three splits never share a sum's operands."""
    problems = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    random.Random(_SEED).shuffle(problems)
    offset = 0
    for name, size in SPLIT_SIZES.items():
        if name == split:
            break
        offset += size
    else:
        raise ValueError(f"unknown split {split!r}")
    rng = random.Random(f"{_SEED}-{split}")
    items = []
    for a, b in problems[offset:offset + SPLIT_SIZES[split]]:
        right = a + b
        wrong = right + rng.choice((-10, -1, 1, 10))
        choices = [f" {right}", f" {wrong}"]
        rng.shuffle(choices)
        items.append(Item(prompt=f"{a} + {b} =", choices=tuple(choices), answer=f" {right}",
                          answer_value=None, id=f"add-{a}-{b}"))
    return items


def _loglik_accuracy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                     items: list[Item], desc: str) -> float:
    """The fraction of items whose right sum has the higher log-likelihood."""
    return evaluate_items(model, tokenizer, items, scorer="loglik", desc=desc).accuracy


@dataclass(frozen=True)
class DemoReport:
    model: str
    sites: tuple[str, ...]
    k: int
    alpha: float
    tune_grid: dict[str, float]  # "k=..,alpha=.." -> tune accuracy; "base" for no steering
    test_accuracy_base: float
    test_accuracy_folded: float
    test_items: int
    verify: dict[str, object]
    figures: list[str]  # PNG files in the demo folder


def run_demo(out: str | Path, *, model_ref: str | None = None, overwrite: bool = False,
             progress: bool = True, echo: Callable[[str], None] = print,
             device: str | None = None, allow_pickle: bool = False) -> DemoReport:
    """Localize, tune, export, verify and evaluate; everything lands in ``out`` at once."""
    model_ref = model_ref or str(smollm2_gguf_path())
    source = resolve_source(model_ref)
    with claim_output(out, overwrite=overwrite, inputs=source.input_paths()) as out_dir:
        echo(f"loading {model_ref}")
        model, tokenizer, _ = load_model(model_ref, dtype="float32", device=device,
                                         allow_pickle=allow_pickle)

        pairs = choice_pairs(arithmetic_items("pairs"))
        echo(f"localizing {len(pairs)} pairs over sites {', '.join(DEMO_SITES)}")
        plan = localize(model, tokenizer, pairs, DEMO_SITES, progress=progress, model_id=source.ref)

        tune, test = arithmetic_items("tune"), arithmetic_items("test")
        configs = len(K_GRID) * len(ALPHA_GRID)
        echo(f"tuning k x alpha ({configs} configurations and the unsteered model) on "
             f"{len(tune)} tune items")
        grid = {"base": _loglik_accuracy(model, tokenizer, tune, "tune unsteered")}
        for index, (k, alpha) in enumerate(((k, a) for k in K_GRID for a in ALPHA_GRID), start=1):
            with steer(model, plan.select(k, alpha)):
                grid[f"k={k},alpha={alpha:g}"] = _loglik_accuracy(
                    model, tokenizer, tune, f"tune {index}/{configs} k={k} alpha={alpha:g}")
            echo(f"  tune  k={k:<3} alpha={alpha:<4g} accuracy {grid[f'k={k},alpha={alpha:g}']:.3f}")
        # Best tune accuracy; ties go to the smaller k, then the smaller alpha (grid order).
        best = max(((k, a) for k in K_GRID for a in ALPHA_GRID),
                   key=lambda ka: (grid[f"k={ka[0]},alpha={ka[1]:g}"], -ka[0], -ka[1]))
        k, alpha = best
        echo(f"chosen on tune: k={k}, alpha={alpha:g} (base tune accuracy {grid['base']:.3f})")

        with atomic_folder(out_dir, content="demo") as staging:
            write_pairs(pairs, staging / "pairs.jsonl")
            plan.save(staging / "plan")
            echo("measuring the edit's cost on neutral text (KL, perplexity ratio)")
            cost = measure_cost(model, tokenizer, plan.select(k, alpha), CostRequest(),
                                progress=progress)
            echo(f"exporting the folded checkpoint to {out_dir / 'model'}")
            folded = copy.deepcopy(model)
            export_loaded(folded, tokenizer, plan, k=k, alpha=alpha, out=staging / "model",
                          sites=plan.sites, base_model=base_model_name(source),
                          location=str((out_dir / "model").resolve()), cost=cost)
            del folded
            echo("verifying the written checkpoint against the hook mode")
            folded_model, _, _ = load_model(staging / "model", device=device)  # the written one
            check: VerifyReport = verify_loaded(model, tokenizer, plan.select(k, alpha), folded_model)
            echo(f"evaluating the base and the folded model on {len(test)} held-out items")
            report = DemoReport(
                model=source.ref, sites=plan.sites, k=k, alpha=alpha, tune_grid=grid,
                test_accuracy_base=_loglik_accuracy(model, tokenizer, test, "test unsteered"),
                test_accuracy_folded=_loglik_accuracy(folded_model, tokenizer, test, "test folded"),
                test_items=len(test), verify=check.to_dict(),
                figures=_figures(staging, plan, k, alpha, grid, echo))
            (staging / "report.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
        return report


def _figures(folder: Path, plan: Plan, k: int, alpha: float, grid: dict[str, float],
             echo: Callable[[str], None]) -> list[str]:
    """The unit map (the paper's Figure 11) and the tune heatmap, when matplotlib is there."""
    if not matplotlib_available():
        echo(f"no figures: matplotlib is not installed; {INSTALL_HINT}")
        return []
    chosen = [(u.site, u.layer, u.unit) for u in plan.ranking(k=k)]
    plot_unit_scores({site: plan.scores(site) for site in plan.sites}, chosen,
                     folder / UNIT_MAP, title=f"unit scores, top {k} circled (alpha {alpha:g})")
    accuracy = [[grid[f"k={kk},alpha={a:g}"] for kk in K_GRID] for a in ALPHA_GRID]
    plot_heatmap(accuracy, K_GRID, ALPHA_GRID, folder / TUNE_HEATMAP, base=grid["base"],
                 title="tune accuracy (log-likelihood of the right sum)")
    return [UNIT_MAP, TUNE_HEATMAP]
