"""Write docs/compare.md: AUSteer against its baselines at matched KL, from `aufold compare` runs.

Each task's runs (the compare.json files given for it) are merged: they must score the
same items with the same scorer and price on the same corpus, and a configuration that
two runs both scored must have the same accuracy and KL in both (the sweep is
deterministic), so a second run can add methods or grid points to a first one. For
every KL budget, each method is credited with its best accuracy among its configurations
within the budget (fewer steered units, then less KL, on a tie), as `aufold compare`
does. The summary under each table is computed from the same numbers.

    python examples/compare_baselines.py \\
        --run copa=cmp-copa/compare.json --run copa=caa-copa/compare.json \\
        --run boolq=cmp-boolq/compare.json --model-name SmolLM2-135M-Instruct --out docs/compare.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
METHODS = ("austeer", "fixed", "random", "block", "caa")
NAMES = {"copa": "COPA", "boolq": "BoolQ", "winogrande": "WinoGrande"}


def merged(files: list[Path]) -> dict[str, Any]:
    """The runs of one task as one: shared settings checked, points united."""
    runs = [json.loads(file.read_text()) for file in files]
    first = runs[0]
    points: dict[tuple[str, str], dict[str, Any]] = {}
    for file, run in zip(files, runs):
        for key in ("model", "task", "split", "scorer", "neutral", "unsteered", "site", "plan",
                    "budgets"):
            if run[key] != first[key]:
                raise SystemExit(f"{file} differs from {files[0]} in {key}; merge runs of one setup")
        for point in run["points"]:
            known = points.setdefault((point["method"], point["setting"]), point)
            if (known["accuracy"], round(known["kl"], 9)) != (point["accuracy"], round(point["kl"], 9)):
                raise SystemExit(f"{point['method']} {point['setting']} differs between runs")
    with_caa = {(r.get("caa_layer"), r.get("caa_pairs")) for r in runs if r.get("caa_layer") is not None}
    if len(with_caa) > 1:
        raise SystemExit(f"the runs' CAA differ ({sorted(with_caa, key=str)}); merge one CAA setup")
    return {**first, "points": list(points.values()),
            "caa_layer": next((r["caa_layer"] for r in runs if r.get("caa_layer") is not None), None),
            "caa_pairs": next((r["caa_pairs"] for r in runs if r.get("caa_pairs")), None)}


def best_within(points: list[dict[str, Any]], method: str, budget: float) -> dict[str, Any] | None:
    within = [p for p in points if p["method"] == method and p["kl"] <= budget]
    return min(within, key=lambda p: (-p["accuracy"], p["units"], p["kl"]), default=None)


def section(task: str, run: dict[str, Any], figures: Path) -> list[str]:
    from aufold.plotting import plot_tradeoff
    from aufold.safety.outputs import is_aufold_output

    base, n = run["unsteered"]["accuracy"], run["unsteered"]["n"]
    budgets = run["budgets"]
    methods = [m for m in METHODS if any(p["method"] == m for p in run["points"])]
    lines = [f"## {NAMES.get(task, task)} ({n} {run['split']} items, unsteered {100 * base:.1f}%)", "",
             f"Best accuracy (%) within each KL budget (nats/token). The block steers every "
             f"unit of {block_layers(run)}, where most top units sit"
             + (f"; CAA steers the residual after layer {run['caa_layer']}, from "
                f"{run['caa_pairs']}." if run.get("caa_layer") is not None else "."), "",
             "| method | " + " | ".join(f"KL <= {b:g}" for b in budgets) + " |",
             "|---|" + "---|" * len(budgets)]
    for method in methods:
        cells = []
        for budget in budgets:
            p = best_within(run["points"], method, budget)
            cells.append(f"{100 * p['accuracy']:.1f} ({p['setting']}, KL {p['kl']:.3f})" if p else "-")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", *summary(run, methods, n), "", "Every configuration:", "",
              "| method | setting | units | accuracy | KL | perplexity ratio |",
              "|---|---|---|---|---|---|"]
    for p in sorted(run["points"], key=lambda p: (METHODS.index(p["method"]), p["kl"])):
        lines.append(f"| {p['method']} | {p['setting']} | {p['units']} | {100 * p['accuracy']:.1f} | "
                     f"{p['kl']:.4f} | {p['perplexity_ratio']:.3f} |")
    per = {m: [(p["kl"], p["accuracy"]) for p in run["points"] if p["method"] == m] for m in methods}
    name = f"compare-{task}-{run['site']}.png"
    if is_aufold_output(figures / name):
        (figures / name).unlink()  # the figure of an earlier report, redrawn
    plot_tradeoff(per, figures / name, base=base, budgets=budgets,
                  title=f"{task} {run['split']} ({Path(run['model']).name}): accuracy vs KL, "
                        f"site {run['site']}")
    return [*lines, "", f"![{task}: accuracy against KL per method](results/{name})", ""]


def block_layers(run: dict[str, Any]) -> str:
    """The layers the block points steer (runs with other k grids may pick other layers)."""
    layers = sorted({int(p["setting"].split()[0].removeprefix("L"))
                     for p in run["points"] if p["method"] == "block"} or {run["block_layer"]})
    return ("layer " if len(layers) == 1 else "layers ") + " and ".join(map(str, layers))


def summary(run: dict[str, Any], methods: list[str], n: int) -> list[str]:
    """Per budget: AUSteer's best against each baseline's best, in items of the split."""
    lines = []
    for budget in run["budgets"]:
        ours = best_within(run["points"], "austeer", budget)
        if ours is None:
            lines.append(f"- KL <= {budget:g}: no AUSteer configuration within the budget.")
            continue
        parts = []
        for method in methods:
            if method == "austeer":
                continue
            theirs = best_within(run["points"], method, budget)
            if theirs is None:
                parts.append(f"{method} has no configuration within it")
                continue
            items = round((ours["accuracy"] - theirs["accuracy"]) * n)
            parts.append(f"{method} {'+' if items <= 0 else '-'}{abs(items)}")
        lines.append(f"- KL <= {budget:g}: AUSteer {100 * ours['accuracy']:.1f}%; each baseline's "
                     f"best against it, in items: {', '.join(parts)}.")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", required=True, metavar="TASK=COMPARE_JSON")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "compare.md")
    parser.add_argument("--model-name", default=None,
                        help="How the title names the model (default: the runs' model folder).")
    parser.add_argument("--intro", type=Path, default=None,
                        help="Markdown to put under the title (the setup and what it shows).")
    args = parser.parse_args()
    by_task: dict[str, list[Path]] = {}
    for given in args.run:
        task, _, file = given.partition("=")
        by_task.setdefault(task, []).append(Path(file))
    figures = args.out.parent / "results"
    figures.mkdir(parents=True, exist_ok=True)
    runs = {task: merged(files) for task, files in by_task.items()}
    name = args.model_name or Path(next(iter(runs.values()))["model"]).name
    lines = [f"# AUSteer against its baselines at matched KL ({name})", ""]
    if args.intro is not None:
        lines += [args.intro.read_text().rstrip(), ""]
    for task, run in runs.items():
        lines += section(task, run, figures)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
