"""Reproduce the AUSteer protocol on SmolLM2-135M-Instruct for five tasks; write docs/results.md.

For each of COPA, BoolQ, WinoGrande, SVAMP and MAWPS (files from ../shared/data):

1. localize once on the task's ``pairs`` split, over the sites head, mlp and mlp-out;
2. sweep alpha x k for each site on the ``tune`` split and pick the best
   (site, k, alpha) by aufold's rule (highest tune accuracy; ties: smaller k,
   then smaller alpha);
3. evaluate on the ``test`` split, in one pass that shares the unsteered layers:
   the unsteered model, AUSteer with the chosen configuration, and the two
   ablations of the paper: the same number of random units of the same site with
   the same alpha (5 seeds), and the chosen units at one fixed strength;
4. draw where the scores are high (layer x unit, like the paper's Figure 11) and
   the tune grid of each site (like its Figure 10).

Everything runs in hook mode; the fold is exact against hooks (see the tests), so
the numbers hold for the exported checkpoint too. The default sizes fit the
whole run in under an hour on 2 CPU cores: they take the first items of each
fixed split where a full split would not fit, and the report says so. ``--full``
runs every split whole (hours on a CPU; minutes on a GPU).

    python examples/reproduce_paper.py                       # writes docs/results.md
    python examples/reproduce_paper.py --tasks copa --out /tmp/results.md
    python examples/reproduce_paper.py --full --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
from collections import Counter
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from aufold.ablations import fixed_strength, random_units  # noqa: E402
from aufold.edit import Edit  # noqa: E402
from aufold.defaults import NEUTRAL_TOKENS  # noqa: E402
from aufold.evaluate.cost import EditCost, NeutralText, edit_costs, neutral_text  # noqa: E402
from aufold.evaluate.edits import evaluate_edits  # noqa: E402
from aufold.evaluate.report import EvalResult  # noqa: E402
from aufold.localize import DEFAULT_TIE_TOLERANCE, localize  # noqa: E402
from aufold.modeling import load_model, local_smollm2  # noqa: E402
from aufold.plan import Plan  # noqa: E402
from aufold.plotting import (  # noqa: E402
    INSTALL_HINT,
    matplotlib_available,
    plot_heatmap,
    plot_unit_scores,
)
from aufold.tasks import get_task, load_split, resolve_data_dir, task_pairs  # noqa: E402
from aufold.tune import CHOICE_RULE, Sweep, sweep  # noqa: E402
from aufold.version import __version__  # noqa: E402

TASKS = ("copa", "boolq", "winogrande", "svamp", "mawps")
SITES = ("head", "mlp", "mlp-out")


@dataclass(frozen=True)
class Budget:
    """How many items of each fixed split to use (None: all), the grid, the math token budget."""

    pairs: int | None = None
    tune: int | None = None
    test: int | None = None
    ks: tuple[int, ...] = (4, 16, 64)
    alphas: tuple[float, ...] = (1.0, 5.0, 20.0)
    max_new_tokens: int = 128


# Math tasks generate token by token under every configuration (no shared layers), so
# their grid is smaller. Sized from measured speed so that the whole run stays under an
# hour on 2 CPU cores in bfloat16; each size is a prefix of the fixed split of
# ../shared/data/README.md.
MATH_GRID = dict(ks=(8, 64), alphas=(5.0, 20.0))
ONE_HOUR_ON_2_CPUS: dict[str, Budget] = {
    "copa": Budget(),
    "boolq": Budget(pairs=300, tune=50, test=300),  # passages make its items 4x longer
    "winogrande": Budget(),
    "svamp": Budget(tune=50, max_new_tokens=12, **MATH_GRID),
    "mawps": Budget(pairs=500, tune=50, max_new_tokens=32, **MATH_GRID),
}
SEEDS = (0, 1, 2, 3, 4)


@dataclass
class TaskRun:
    """Everything one task's protocol measured."""

    task: str
    sizes: dict[str, int]
    full_sizes: dict[str, int]
    max_new_tokens: int
    plan: Plan
    sweep: Sweep
    site: str
    k: int
    alpha: float
    steered: Edit
    test_base: EvalResult
    test_steered: EvalResult
    test_fixed: EvalResult
    test_random: list[EvalResult]
    chance: float | None  # 1 / number of choices; None for math
    choices: list[tuple[str, ...]]  # each test item's choices (empty for math)
    seconds: dict[str, float] = field(default_factory=dict)
    figures: list[str] = field(default_factory=list)
    # Each test edit's KL and perplexity ratio on neutral text (austeer, fixed, random-SEED).
    costs: dict[str, EditCost] = field(default_factory=dict)


def run_task(model: Any, tokenizer: Any, task: str, budget: Budget, *, data_dir: Path,
             seeds: tuple[int, ...], batch_size: int, figures: Path | None,
             neutral: NeutralText | None = None) -> TaskRun:
    kind = get_task(task).kind
    clock: dict[str, float] = {}
    full = {split: len(load_split(task, split, data_dir)) for split in ("pairs", "tune", "test")}

    started = time.perf_counter()
    pairs = task_pairs(task, data_dir, size=budget.pairs)
    plan = localize(model, tokenizer, pairs, SITES, batch_size=batch_size, progress=False)
    clock["localize"] = time.perf_counter() - started

    started = time.perf_counter()
    tune_items = load_split(task, "tune", data_dir, size=budget.tune)
    grid = sweep(model, tokenizer, plan, tune_items, sites=SITES, ks=budget.ks, alphas=budget.alphas, kind=kind,
                 batch_size=batch_size, max_new_tokens=budget.max_new_tokens, progress=False)
    best = grid.best()
    clock["tune"] = time.perf_counter() - started

    started = time.perf_counter()
    test_items = load_split(task, "test", data_dir, size=budget.test)
    steered = plan.select(best.k, best.alpha, [best.site])
    edits: dict[str, Edit] = {"austeer": steered,
                              "fixed": fixed_strength(plan, best.k, best.alpha, [best.site])}
    for seed in seeds:
        edits[f"random-{seed}"] = random_units(plan, best.k, best.alpha, [best.site], seed)
    test = evaluate_edits(model, tokenizer, test_items, edits, kind=kind, batch_size=batch_size,
                          max_new_tokens=budget.max_new_tokens, progress=False)
    clock["test"] = time.perf_counter() - started
    costs: dict[str, EditCost] = {}
    if neutral is not None:
        started = time.perf_counter()
        costs = edit_costs(model, neutral, edits, progress=False)
        clock["cost"] = time.perf_counter() - started

    run = TaskRun(task, {"pairs": len(pairs), "tune": len(tune_items), "test": len(test_items)},
                  full, budget.max_new_tokens, plan, grid, best.site, best.k, best.alpha, steered,
                  test.base, test.steered["austeer"], test.steered["fixed"],
                  [test.steered[f"random-{seed}"] for seed in seeds],
                  1 / len(test_items[0].choices) if kind == "choice" else None,
                  [tuple(item.choices) for item in test_items], clock)
    run.costs = costs
    if figures is not None:
        run.figures = draw(run, figures)
    return run


def draw(run: TaskRun, folder: Path) -> list[str]:
    """The unit map of the task and one tune heatmap per site; returns the file names."""
    chosen = [(unit.site, unit.layer, unit.unit) for unit in run.steered.units]
    names = [plot_unit_scores({site: run.plan.scores(site) for site in SITES}, chosen,
                              folder / f"{run.task}-units.png",
                              title=f"{run.task}: unit scores on {run.sizes['pairs']} pairs; "
                                    f"circled: the {len(chosen)} steered units").name]
    for site in run.sweep.sites():
        ks, alphas = run.sweep.axes(site)
        names.append(plot_heatmap(run.sweep.matrix(site), ks, alphas,
                                  folder / f"{run.task}-tune-{site}.png",
                                  base=run.sweep.base.accuracy,
                                  title=f"{run.task} tune accuracy, site {site}").name)
    return names


def kl_cell(run: TaskRun, edit: str) -> str:
    return f"{run.costs[edit].kl:.3g}" if edit in run.costs else "-"


def ratio_cell(run: TaskRun, edit: str) -> str:
    return f"{run.costs[edit].perplexity_ratio:.4f}" if edit in run.costs else "-"


def answer_rate(result: EvalResult, choices: list[tuple[str, ...]]) -> float:
    """The share of predictions that are an answer at all: one of the item's choices (first
    token, case and spaces ignored), or for math any number."""
    def is_answer(prediction: str, options: tuple[str, ...]) -> bool:
        if not options:
            return prediction != ""
        return prediction.strip().lower() in {option.strip().lower() for option in options}
    return sum(is_answer(item.prediction, options)
               for item, options in zip(result.items, choices)) / result.n


def most_common(result: EvalResult, tokenizer: Any) -> str:
    """The most frequent prediction; a first token that decodes to nothing is a special token,
    so it is named by its token instead."""
    def shown(item: Any) -> str:
        token = item.detail.get("token_id")
        if item.prediction or token is None:
            return repr(item.prediction)
        return f"the special token {tokenizer.convert_ids_to_tokens(token)}"
    prediction, count = Counter(shown(item) for item in result.items).most_common(1)[0]
    return f"{prediction} ({count} of {result.n})"


def percent(value: float) -> str:
    return f"{100 * value:.1f}"


def with_ci(result: EvalResult) -> str:
    low, high = result.ci95
    return f"{percent(result.accuracy)} [{percent(low)}, {percent(high)}]"


def random_summary(results: list[EvalResult]) -> str:
    values = [r.accuracy for r in results]
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return (f"{percent(statistics.mean(values))} ± {percent(spread)} "
            f"({percent(min(values))}-{percent(max(values))})")


def size_note(run: TaskRun) -> str:
    parts = []
    for split in ("pairs", "tune", "test"):
        used, whole = run.sizes[split], run.full_sizes[split]
        parts.append(f"{split} {used}" + ("" if used == whole else f" of {whole}"))
    return ", ".join(parts)


def write_markdown(runs: list[TaskRun], settings: dict[str, Any], path: Path,
                   figure_folder: str | None, tokenizer: Any) -> None:
    lines = [
        "# AUSteer on SmolLM2-135M-Instruct: what steering buys",
        "",
        "Generated by `python examples/reproduce_paper.py`; do not edit by hand. "
        f"aufold {__version__}, model `{settings['model']}` ({settings['dtype']}), "
        f"{settings['device']}, total wall time {settings['minutes']:.1f} min.",
        "",
        "Protocol (per task): localize once on the `pairs` split over the sites "
        f"{', '.join(SITES)} (differences within {DEFAULT_TIE_TOLERANCE:g} of the activations' RMS "
        "count as ties); sweep the k x alpha grid below for each site on `tune`; "
        f"choose by: {CHOICE_RULE}; then evaluate once on `test`. Scorers: the first generated "
        "token (greedy, exact match) for the multiple-choice tasks, the final number of a greedy "
        "answer for the math tasks. Accuracies in %, with Wilson 95% intervals. *Answers given* "
        "is the share of test predictions that are an answer at all (one of the choices, or a "
        "number): under the first-token protocol a model that starts its reply with anything "
        "else scores zero on that item.",
        "",
        "## Vanilla vs AUSteer on test",
        "",
        "| task | test items | vanilla | AUSteer | gain | KL on neutral text | perplexity ratio "
        "| chosen site | k | alpha | steered units "
        "| earliest layer | tune: vanilla -> chosen | answers given: vanilla -> AUSteer |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        gain = run.test_steered.accuracy - run.test_base.accuracy
        best_tune = max(r.accuracy for r in run.sweep.cells.values())
        start = min(unit.layer for unit in run.steered.units)
        lines.append(
            f"| {run.task} | {run.test_base.n} | {with_ci(run.test_base)} | "
            f"{with_ci(run.test_steered)} | {gain * 100:+.1f} | {kl_cell(run, 'austeer')} | "
            f"{ratio_cell(run, 'austeer')} | {run.site} | {run.k} | "
            f"{run.alpha:g} | {len(run.steered)} | {start} | "
            f"{percent(run.sweep.base.accuracy)} -> {percent(best_tune)} | "
            f"{percent(answer_rate(run.test_base, run.choices))} -> "
            f"{percent(answer_rate(run.test_steered, run.choices))} |")
    lines += [
        "",
        "## Ablations on test (same site, k and alpha as the chosen configuration)",
        "",
        f"- random units: k units drawn uniformly from all layers of the chosen site, each "
        f"steered by its own counts; {len(settings['seeds'])} seeds, mean ± standard deviation "
        "(min-max).",
        "- fixed strength: the chosen units in their own directions, all with the same |gamma| "
        "(alpha times their mean score), so only the per-unit strength is removed.",
        "",
        "| task | vanilla | AUSteer | random units | fixed strength | KL: AUSteer / random "
        "(mean) / fixed |",
        "|---|---|---|---|---|---|",
    ]
    for run in runs:
        random_kl = (f"{statistics.mean(run.costs[f'random-{seed}'].kl for seed in SEEDS):.3g}"
                     if run.costs else "-")
        lines.append(f"| {run.task} | {percent(run.test_base.accuracy)} | "
                     f"{percent(run.test_steered.accuracy)} | {random_summary(run.test_random)} | "
                     f"{percent(run.test_fixed.accuracy)} | {kl_cell(run, 'austeer')} / "
                     f"{random_kl} / {kl_cell(run, 'fixed')} |")
    lines += ["", "## Tune grids (accuracy %, rows alpha, columns k)", ""]
    for run in runs:
        lines.append(f"**{run.task}** (vanilla {percent(run.sweep.base.accuracy)} on "
                     f"{run.sweep.base.n} tune items)")
        lines.append("")
        for site in run.sweep.sites():
            ks, alphas = run.sweep.axes(site)
            lines.append(f"| {site} | " + " | ".join(f"k={k}" for k in ks) + " |")
            lines.append("|---" * (len(ks) + 1) + "|")
            for alpha, row in zip(alphas, run.sweep.matrix(site)):
                lines.append(f"| alpha={alpha:g} | " + " | ".join(percent(v) for v in row) + " |")
            lines.append("")
    if figure_folder is not None:
        lines += ["## Where the units sit", "",
                  "Scores max(r_pos, r_neg) of every unit (layers up, units across) for each "
                  "site; the steered units are circled. The tune heatmaps sit beside them.", ""]
        for run in runs:
            lines.append(f"![{run.task} unit scores]({figure_folder}/{run.figures[0]})")
            lines.append("")
    lines += ["## Sizes and time", "",
              "| task | items used | math token budget | localize s | tune s | test s |",
              "|---|---|---|---|---|---|"]
    for run in runs:
        budget = str(run.max_new_tokens) if get_task(run.task).kind == "math" else "-"
        lines.append(f"| {run.task} | {size_note(run)} | {budget} | "
                     f"{run.seconds['localize']:.0f} | {run.seconds['tune']:.0f} | "
                     f"{run.seconds['test']:.0f} |")
    subsampled = [run.task for run in runs if run.sizes != run.full_sizes]
    lines += [""]
    if subsampled:
        lines.append(f"Subsampled to fit the one-hour budget on 2 CPU cores: "
                     f"{', '.join(subsampled)}. Each size is the first items of the fixed split "
                     "of `../shared/data/README.md`, which itself prescribes no subsampling; run "
                     "`--full` for every split whole.")
    else:
        lines.append("Every split was used whole.")
    lines += ["", "## Findings", "", *findings(runs, tokenizer), "", *MATCHED_KL_SECTION]
    path.write_text("\n".join(lines))


# The paper's claim at matched side effects is tested by `aufold compare`, a separate run per
# task (it sweeps each method's strengths and prices every configuration in KL on neutral
# text); examples/compare_baselines.py writes its report.
MATCHED_KL_SECTION = [
    "## AUSteer against its baselines at matched KL",
    "",
    "Accuracy alone cannot test the paper's claim (steering less achieves more), since a "
    "stronger edit can buy accuracy with fluency. `aufold compare` scores AUSteer, the same "
    "units at one fixed strength, random units, a whole block of one layer and CAA on a "
    "task's tune split, prices every configuration by its KL(base || steered) on neutral "
    "text, and credits each method with its best accuracy within each KL budget. The "
    "SmolLM2 runs on COPA and BoolQ, with every configuration and the accuracy-vs-KL plots, "
    "are in [compare.md](compare.md) (written by `examples/compare_baselines.py`).",
    "",
]


def findings(runs: list[TaskRun], tokenizer: Any) -> list[str]:
    """Plain statements of what the numbers show, computed, not written by hand."""
    notes = []
    for run in runs:
        gain = run.test_steered.accuracy - run.test_base.accuracy
        low, high = run.test_base.ci95
        inside = low - 1e-9 <= run.test_steered.accuracy <= high + 1e-9
        random_mean = statistics.mean(r.accuracy for r in run.test_random)
        sentence = (f"- **{run.task}**: AUSteer {gain * 100:+.1f} points on test "
                    f"({'inside' if inside else 'outside'} the vanilla 95% interval); random units "
                    f"{(random_mean - run.test_base.accuracy) * 100:+.1f}, fixed strength "
                    f"{(run.test_fixed.accuracy - run.test_base.accuracy) * 100:+.1f}.")
        if run.chance is not None and run.test_base.accuracy < run.chance + 0.05:
            sentence += f" Vanilla is within 5 points of chance ({percent(run.chance)}) or below."
        rate = answer_rate(run.test_base, run.choices)
        if rate < 0.9:
            sentence += (f" Only {percent(rate)}% of vanilla predictions are an answer at all; "
                         f"the most common is {most_common(run.test_base, tokenizer)}.")
        notes.append(sentence)
    return notes


def budget_for(task: str, *, full: bool, limit: int | None) -> Budget:
    budget = ONE_HOUR_ON_2_CPUS[task]
    if full:
        budget = replace(budget, pairs=None, tune=None, test=None)
    if limit is None:
        return budget
    pairs, tune, test = (limit if size is None else min(size, limit)
                         for size in (budget.pairs, budget.tune, budget.test))
    return replace(budget, pairs=pairs, tune=tune, test=test)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct")
    parser.add_argument("--data-dir", default=None, help="default: ../shared/data")
    parser.add_argument("--out", default=str(REPO / "docs" / "results.md"))
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--full", action="store_true", help="every split whole")
    parser.add_argument("--limit", type=int, default=None,
                        help="at most this many items of every split (a quick look)")
    parser.add_argument("--small-grid", action="store_true",
                        help="one configuration per site (k=2, alpha=5): a smoke test")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16",
                        help="bfloat16 (default: about twice as fast on CPU as float32) or float32")
    parser.add_argument("--device", default=None)
    parser.add_argument("--no-figures", action="store_true")
    parser.add_argument("--neutral-tokens", type=int, default=NEUTRAL_TOKENS,
                        help="tokens of neutral text (BoolQ test passages) to price each test edit "
                             "on, in KL; 0 skips it")
    args = parser.parse_args()

    data_dir = resolve_data_dir(args.data_dir)
    reference = args.model or local_smollm2(REPO)
    out = Path(args.out).resolve()
    figure_folder = None if args.no_figures else out.stem
    if figure_folder is not None and not matplotlib_available():
        print(f"no figures: matplotlib is not installed; {INSTALL_HINT}")
        figure_folder = None
    started = time.perf_counter()
    model, tokenizer, source = load_model(reference, dtype=args.dtype, device=args.device)
    device = str(next(model.parameters()).device)
    neutral = (neutral_text(tokenizer, data_dir=data_dir, tokens=args.neutral_tokens)
               if args.neutral_tokens else None)
    print(f"{source.ref} ({args.dtype}) on {device}, {torch.get_num_threads()} threads; "
          f"tasks {', '.join(args.tasks)}", flush=True)

    # Everything is written to a staging folder and moved into place at the end, so an
    # interrupted run leaves the previous report intact.
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".reproduce-", dir=out.parent))
    try:
        figures = None if figure_folder is None else staging / figure_folder
        if figures is not None:
            figures.mkdir()
        runs = []
        for task in args.tasks:
            budget = budget_for(task, full=args.full, limit=args.limit)
            if args.small_grid:
                budget = replace(budget, ks=(2,), alphas=(5.0,))
            run = run_task(model, tokenizer, task, budget, data_dir=data_dir, seeds=SEEDS,
                           batch_size=args.batch_size, figures=figures, neutral=neutral)
            runs.append(run)
            print(f"{task}: vanilla {percent(run.test_base.accuracy)} -> AUSteer "
                  f"{percent(run.test_steered.accuracy)} ({run.site} k={run.k} "
                  f"alpha={run.alpha:g}); " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds
                                                         in run.seconds.items()), flush=True)
        settings = {"model": "HuggingFaceTB/SmolLM2-135M-Instruct" if args.model is None
                    else source.ref, "dtype": args.dtype,
                    "device": f"{device}, {torch.get_num_threads()} threads "
                              f"({platform.processor() or platform.machine()})",
                    "minutes": (time.perf_counter() - started) / 60, "seeds": SEEDS}
        write_markdown(runs, settings, staging / out.name, figure_folder, tokenizer)
        (staging / f"{out.stem}.json").write_text(json.dumps(
            [record(run) for run in runs], indent=2) + "\n")
        for item in staging.iterdir():
            if item.is_dir():  # the figures: replace this script's own, keep any others there
                (out.parent / item.name).mkdir(exist_ok=True)
                for figure in item.iterdir():
                    os.replace(figure, out.parent / item.name / figure.name)
            else:
                os.replace(item, out.parent / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"wrote {out} in {(time.perf_counter() - started) / 60:.1f} min")


def record(run: TaskRun) -> dict[str, Any]:
    """The raw numbers of one task, for docs/results.json."""
    return {
        "task": run.task, "sizes": run.sizes, "full_sizes": run.full_sizes,
        "max_new_tokens": run.max_new_tokens,
        "chosen": {"site": run.site, "k": run.k, "alpha": run.alpha,
                   "units": run.steered.to_records()},
        "tune": {"vanilla": run.sweep.base.summary(), "grid": run.sweep.records()},
        "test": {"vanilla": run.test_base.summary(), "austeer": run.test_steered.summary(),
                 "fixed_strength": run.test_fixed.summary(),
                 "random_units": [r.summary() for r in run.test_random]},
        "cost": {name: cost.to_dict() for name, cost in run.costs.items()},
        "seconds": run.seconds,
    }


if __name__ == "__main__":
    main()
