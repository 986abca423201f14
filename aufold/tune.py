"""Tuning: sweep alpha x k per site on the tune split, pick the best, report it once on test.

The sweep evaluates the unsteered model and every configuration (site, k, alpha)
on the same batches through :func:`aufold.evaluate.edits.evaluate_edits`, which
resumes each configuration of a multiple-choice task from its earliest steered
layer, with results identical to evaluating it from scratch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedTokenizerBase

from aufold.defaults import ALPHA_GRID, K_GRID  # the grids of the AUSteer paper
from aufold.edit import Edit
from aufold.errors import AufoldError
from aufold.evaluate.batches import DEFAULT_BATCH_SIZE
from aufold.evaluate.cost import EditCost, NeutralText, check_neutral, edit_costs, neutral_text
from aufold.evaluate.core import DEFAULT_EVAL_MAX_LENGTH, evaluate_both, resolve_scorer
from aufold.evaluate.edits import evaluate_edits
from aufold.evaluate.math import DEFAULT_MAX_NEW_TOKENS
from aufold.evaluate.report import EvalResult, write_json, write_report
from aufold.evaluate.resume import MAX_RESUME_POINTS
from aufold.layerwise import load_for_run
from aufold.layerwise.evaluate import MATH_NEEDS_WHOLE_MODEL
from aufold.localize import DEFAULT_BATCH_SIZE as LOCALIZE_BATCH_SIZE
from aufold.modeling import fingerprint, is_layerwise, layer_widths, resolve_source
from aufold.plan import Plan, check_alpha
from aufold.plotting import INSTALL_HINT, matplotlib_available, plot_heatmap
from aufold.safety.limits import check_scale_factors
from aufold.safety.outputs import Inputs, atomic_folder, claim_output
from aufold.shards import localize_any
from aufold.sites import SITE_ORDER, site_kind
from aufold.tasks import Item, TaskKind, get_task, load_split, resolve_data_dir, task_pairs
from aufold.tuned import TUNE_FILE, TUNE_FORMAT
from aufold.version import __version__

if TYPE_CHECKING:
    from transformers import PreTrainedModel

CHOICE_RULE = ("highest tune accuracy; ties: smaller k, then smaller alpha, then site in the "
               "order head, mlp, mlp-out, residual")
PLAN_FOLDER = "plan"
TEST_BASE_REPORT = "test-base.json"
TEST_STEERED_REPORT = "test-steered.json"


@dataclass(frozen=True)
class Config:
    """One point of the sweep: steer the top-k units of one site with strength alpha."""

    site: str
    k: int
    alpha: float

    def label(self) -> str:
        return f"{self.site} k={self.k} alpha={self.alpha:g}"


def grid_configs(sites: Sequence[str], ks: Sequence[int], alphas: Sequence[float]) -> list[Config]:
    """Every (site, k, alpha), sites in table order, then k, then alpha ascending."""
    ordered = sorted(dict.fromkeys(sites), key=SITE_ORDER.__getitem__)
    return [Config(site, k, alpha) for site in ordered for k in sorted(set(ks))
            for alpha in sorted(set(alphas))]


def check_grid_values(sites: Sequence[str], ks: Sequence[int], alphas: Sequence[float], *,
                      allow_extreme: bool = False) -> None:
    """The grid's own checks, which need neither the model nor the plan."""
    if not sites:
        raise AufoldError("no site to tune; pass at least one --site (head, mlp, mlp-out, residual)")
    for site in sites:
        site_kind(site)
    if not ks or not alphas:
        raise AufoldError("the k and alpha grids must each hold at least one value")
    for k in ks:
        if not isinstance(k, int) or k < 1:
            raise AufoldError(f"every k of the grid must be a positive integer, got {k!r}")
    for alpha in alphas:
        check_alpha(alpha)
    # A unit's score is at most 1, so 1 + |alpha| bounds the size of its scale factor.
    check_scale_factors(((f"alpha {alpha:g} of the grid", 1.0 + abs(alpha)) for alpha in alphas),
                        allow_extreme=allow_extreme, what="possible scale factor 1 + |alpha|",
                        fix="lower the --alpha-grid")


def check_grid_units(units: Mapping[str, int], ks: Sequence[int]) -> None:
    """Refuse a k larger than the units a site has, before any sweeping."""
    for site, available in units.items():
        if max(ks) > available:
            raise AufoldError(f"k={max(ks)} is larger than the {available} units of site {site}; "
                              f"lower the k grid to at most {available}")


def choose(accuracy: Mapping[Config, float], *, costs: Mapping[Config, EditCost] | None = None,
           max_kl: float | None = None) -> Config:
    """The best configuration by :data:`CHOICE_RULE`, among those whose KL on neutral text is
    at most ``max_kl`` when a budget is given."""
    if not accuracy:
        raise AufoldError("the sweep is empty; give at least one site, k and alpha")
    allowed = list(accuracy)
    if max_kl is not None:
        if not costs:
            raise AufoldError("--max-kl needs the KL of every configuration; drop --no-cost")
        allowed = [config for config in accuracy if costs[config].kl <= max_kl]
        if not allowed:
            least = min(accuracy, key=lambda c: costs[c].kl)
            raise AufoldError(f"no configuration has a KL on neutral text within --max-kl "
                              f"{max_kl:g}; the smallest is {costs[least].kl:.4g} ({least.label()}): "
                              f"raise --max-kl or add smaller alphas or ks to the grid")
    return min(allowed, key=lambda c: (-accuracy[c], c.k, c.alpha, SITE_ORDER[c.site]))


@dataclass
class Sweep:
    """The unsteered result and one result per configuration, all on the same tune items."""

    base: EvalResult
    cells: dict[Config, EvalResult]
    start_layers: dict[Config, int]  # each configuration's earliest steered layer
    seconds: float
    resumed_from: dict[Config, int] = field(default_factory=dict)  # empty when not resumed
    costs: dict[Config, EditCost] = field(default_factory=dict)  # empty when not measured

    @property
    def resumed(self) -> bool:
        return bool(self.resumed_from)

    def accuracy(self) -> dict[Config, float]:
        return {config: result.accuracy for config, result in self.cells.items()}

    def best(self, max_kl: float | None = None) -> Config:
        return choose(self.accuracy(), costs=self.costs, max_kl=max_kl)

    def sites(self) -> list[str]:
        return list(dict.fromkeys(config.site for config in self.cells))

    def axes(self, site: str) -> tuple[list[int], list[float]]:
        ks = sorted({c.k for c in self.cells if c.site == site})
        alphas = sorted({c.alpha for c in self.cells if c.site == site})
        return ks, alphas

    def matrix(self, site: str) -> list[list[float]]:
        """Accuracy per [alpha][k] for one site, in ascending alpha and k."""
        ks, alphas = self.axes(site)
        return [[self.cells[Config(site, k, alpha)].accuracy for k in ks] for alpha in alphas]

    def kl_matrix(self, site: str) -> list[list[float]] | None:
        """KL on neutral text per [alpha][k] for one site, when the costs were measured."""
        if not self.costs:
            return None
        ks, alphas = self.axes(site)
        return [[self.costs[Config(site, k, alpha)].kl for k in ks] for alpha in alphas]

    def table(self, site: str) -> str:
        """The grid of one site as text: a row per alpha, a column per k."""
        ks, alphas = self.axes(site)
        lines = [f"site {site}: tune accuracy (unsteered {self.base.accuracy:.3f}, "
                 f"n={self.base.n}); rows alpha, columns k",
                 "alpha\\k " + "".join(f"{k:>7}" for k in ks)]
        for alpha, row in zip(alphas, self.matrix(site)):
            lines.append(f"{alpha:>7g} " + "".join(f"{value:>7.3f}" for value in row))
        if self.costs:
            first = next(iter(self.costs.values()))
            lines.append(f"site {site}: KL(base || steered) on neutral text, nats/token "
                         f"({first.corpus}, {first.tokens} tokens)")
            lines.append("alpha\\k " + "".join(f"{k:>9}" for k in ks))
            for alpha in alphas:
                lines.append(f"{alpha:>7g} " + "".join(
                    f"{self.costs[Config(site, k, alpha)].kl:>9.3g}" for k in ks))
        return "\n".join(lines)

    def records(self) -> list[dict[str, Any]]:
        return [{"site": c.site, "k": c.k, "alpha": c.alpha, "accuracy": r.accuracy,
                 "correct": r.correct, "n": r.n, "start_layer": self.start_layers[c],
                 "resumed_from": self.resumed_from.get(c),
                 **({"kl": self.costs[c].kl, "perplexity_ratio": self.costs[c].perplexity_ratio}
                    if c in self.costs else {})}
                for c, r in self.cells.items()]


@torch.inference_mode()
def sweep(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    plan: Plan,
    items: Sequence[Item],
    *,
    sites: Sequence[str],
    ks: Sequence[int] = K_GRID,
    alphas: Sequence[float] = ALPHA_GRID,
    kind: TaskKind = "choice",
    scorer: str | None = None,
    resume: bool = True,
    batch_size: int = DEFAULT_BATCH_SIZE,
    chat_template: bool = False,
    max_length: int = DEFAULT_EVAL_MAX_LENGTH,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    max_resume_points: int = MAX_RESUME_POINTS,
    progress: bool = True,
    allow_extreme: bool = False,
    neutral: NeutralText | None = None,
) -> Sweep:
    """Evaluate the unsteered model and every (site, k, alpha) of the grid on ``items``, and
    with ``neutral`` text each configuration's cost on it (:mod:`aufold.evaluate.cost`).

    Each site ranks only its own units of ``plan``. ``resume=False`` evaluates every
    configuration from scratch (math tasks always do); the results are the same.
    ``max_resume_points`` caps the hidden-state tensors held per batch
    (:func:`~aufold.evaluate.resume.resume_points`).
    """
    check_grid_values(sites, ks, alphas, allow_extreme=allow_extreme)
    check_grid_units({site: plan.num_units([site]) for site in sites}, ks)
    name = resolve_scorer(kind, scorer)
    edits = {config: plan.select(config.k, config.alpha, [config.site], allow_extreme=allow_extreme)
             for config in grid_configs(sites, ks, alphas)}
    if neutral is not None and is_layerwise(model):
        from aufold.layerwise.cost import check_cost_room

        check_cost_room(model, neutral, len(edits))  # before the sweep, not after it
    results = evaluate_edits(model, tokenizer, items, edits, kind=kind, scorer=name, resume=resume,
                             batch_size=batch_size, chat_template=chat_template,
                             max_length=max_length, max_new_tokens=max_new_tokens,
                             max_resume_points=max_resume_points, progress=progress, desc="tune")
    costs = edit_costs(model, neutral, edits, progress=progress) if neutral is not None else {}
    return Sweep(results.base, results.steered, results.start_layers, results.seconds,
                 results.resumed_from, costs)


@dataclass
class TuneOutcome:
    """What `aufold tune` found and wrote."""

    out: Path
    sweep: Sweep
    best: Config
    test_base: EvalResult
    test_steered: EvalResult
    record: dict[str, Any]
    heatmaps: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def tune(
    model_ref: str | Path,
    task: str,
    *,
    out: str | Path,
    sites: Sequence[str] = (),
    plan_dir: str | Path | None = None,
    ks: Sequence[int] = K_GRID,
    alphas: Sequence[float] = ALPHA_GRID,
    scorer: str | None = None,
    data_dir: str | Path | None = None,
    pairs_size: int | None = None,
    tune_size: int | None = None,
    test_size: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    localize_batch_size: int = LOCALIZE_BATCH_SIZE,
    chat_template: bool = False,
    max_length: int = DEFAULT_EVAL_MAX_LENGTH,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    dtype: str = "auto",
    device: str | None = None,
    device_map: str | None = None,
    force: bool = False,
    overwrite: bool = False,
    plot: bool = True,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    allow_pickle: bool = False,
    allow_extreme: bool = False,
    layer_streaming: bool = False,
    work_dir: Path | None = None,
    cost: bool = True,
    neutral: str | Path | None = None,
    max_kl: float | None = None,
) -> TuneOutcome:
    """The AUSteer protocol: localize on ``pairs`` (or take ``plan_dir``), sweep on ``tune``,
    choose by :data:`CHOICE_RULE`, evaluate the choice and the unsteered model on ``test``.

    Writes ``out/tune.json`` (grid, choice, test results), the test reports with every
    prediction, the plan when it was localized here, and a heatmap per site when
    matplotlib is installed. Every input is checked before the model loads. With
    ``layer_streaming`` (or when the weights do not fit) localization, the sweep and the
    test evaluation run one decoder layer at a time (:mod:`aufold.layerwise`).

    With ``cost`` (the default) each configuration's KL and perplexity ratio on neutral
    text (``neutral``, a text file, or the BoolQ test passages) is measured and shown beside
    its accuracy, and ``max_kl`` limits the choice to configurations within that budget.
    """
    if max_kl is not None and not (max_kl >= 0 and math.isfinite(max_kl)):
        raise AufoldError(f"--max-kl must be a finite number >= 0, got {max_kl}")
    if max_kl is not None and not cost:
        raise AufoldError("--max-kl needs the KL of every configuration; drop --no-cost")
    kind = get_task(task).kind
    name = resolve_scorer(kind, scorer)
    source = resolve_source(model_ref)
    inputs = Inputs.of([*source.input_paths(), plan_dir, resolve_data_dir(data_dir),
                        neutral if cost else None])
    if cost:
        check_neutral(neutral, data_dir)
    with claim_output(out, overwrite=overwrite, inputs=inputs) as out_dir:
        plan = Plan.load(plan_dir) if plan_dir is not None else None
        sites = tuple(dict.fromkeys(sites)) or (plan.sites if plan is not None else ())
        check_grid_values(sites, ks, alphas, allow_extreme=allow_extreme)
        if plan is not None:
            check_grid_units({site: plan.num_units([site]) for site in sites}, ks)
            if pairs_size is not None:
                raise AufoldError("--pairs-size sizes a new localization; drop it when giving --plan")
        tune_items = load_split(task, "tune", data_dir, size=tune_size, option="--tune-size")
        test_items = load_split(task, "test", data_dir, size=test_size, option="--test-size")
        pairs = task_pairs(task, data_dir, size=pairs_size) if plan is None else None

        echo(f"loading {model_ref}")
        model, tokenizer, source = load_for_run(
            model_ref, layer_streaming=layer_streaming, work_dir=work_dir, dtype=dtype,
            device=device, device_map=device_map, sites=sites, allow_pickle=allow_pickle,
            needs_whole_model=MATH_NEEDS_WHOLE_MODEL if kind == "math" else None)
        if plan is not None:
            plan.check_fingerprint(fingerprint(model), force=force)
        else:
            assert pairs is not None
            check_grid_units({site: sum(layer_widths(model, site)) for site in sites}, ks)
            echo(f"localizing on {len(pairs)} pairs of {task} over sites {', '.join(sites)}")
            plan = localize_any(model, tokenizer, pairs, sites, batch_size=localize_batch_size,
                                chat_template=chat_template, progress=progress,
                                model_id=source.ref)

        echo(f"sweeping {len(sites) * len(set(ks)) * len(set(alphas))} configurations on "
             f"{len(tune_items)} tune items ({name} scorer)")
        options: dict[str, Any] = dict(batch_size=batch_size, chat_template=chat_template,
                                       max_length=max_length, max_new_tokens=max_new_tokens)
        neutral_tokens = None
        notes: list[str] = []
        if cost:
            neutral_tokens = neutral_text(tokenizer, file=neutral, data_dir=data_dir)
        result = sweep(model, tokenizer, plan, tune_items, sites=sites, ks=ks, alphas=alphas,
                       kind=kind, scorer=name, progress=progress, allow_extreme=allow_extreme,
                       neutral=neutral_tokens, **options)
        best = result.best(max_kl)
        echo(f"chosen on tune: {best.label()} (tune accuracy {result.cells[best].accuracy:.3f}, "
             f"unsteered {result.base.accuracy:.3f})")
        echo(f"evaluating on {len(test_items)} test items, unsteered and steered")
        edit = plan.select(best.k, best.alpha, [best.site], allow_extreme=allow_extreme)
        test_base, test_steered = evaluate_both(model, tokenizer, test_items, edit, kind=kind,
                                                scorer=name, progress=progress, **options)

        if result.cells[best].accuracy <= result.base.accuracy:
            notes.append("no configuration beat the unsteered model on tune")
        with atomic_folder(out_dir, content="tune") as staging:
            plan_ref: str = PLAN_FOLDER
            if plan_dir is None:
                plan.save(staging / PLAN_FOLDER)
            else:
                plan_ref = str(Path(plan_dir).expanduser().resolve())
            for report_name, report in ((TEST_BASE_REPORT, test_base), (TEST_STEERED_REPORT, test_steered)):
                report.settings.update(model=source.ref, task=task, split="test")
                write_report(report, staging / report_name)
            heatmaps = []
            if plot and matplotlib_available():
                for site in result.sites():
                    ks_axis, alphas_axis = result.axes(site)
                    path = plot_heatmap(result.matrix(site), ks_axis, alphas_axis,
                                        staging / f"heatmap-{site}.png", base=result.base.accuracy,
                                        kl=result.kl_matrix(site),
                                        title=f"{task} tune accuracy (and KL), site {site} "
                                              f"(unsteered {result.base.accuracy:.3f})")
                    heatmaps.append(path.name)
            elif plot:
                notes.append(f"no heatmap: matplotlib is not installed; {INSTALL_HINT}")
            record = _record(source.ref, task, resolve_data_dir(data_dir), name, plan_ref, plan, result,
                             best, test_base, test_steered, edit, options, heatmaps, notes, max_kl)
            write_json(record, staging / TUNE_FILE)
        return TuneOutcome(out_dir, result, best, test_base, test_steered, record,
                           [out_dir / name for name in heatmaps], notes)


def _record(model: str, task: str, data_dir: Path, scorer: str, plan_ref: str, plan: Plan,
            result: Sweep, best: Config, test_base: EvalResult, test_steered: EvalResult,
            edit: Edit, options: Mapping[str, Any], heatmaps: list[str],
            notes: list[str], max_kl: float | None = None) -> dict[str, Any]:
    """The content of tune.json; :func:`aufold.tuned.read_tuned` reads ``plan`` and ``best``."""
    ks = sorted({c.k for c in result.cells})
    alphas = sorted({c.alpha for c in result.cells})
    return {
        "format": TUNE_FORMAT,
        "aufold_version": __version__,
        "model": model,
        "task": task,
        "data_dir": str(data_dir),
        "scorer": scorer,
        "settings": dict(options),
        "plan": plan_ref,
        "plan_fingerprint": plan.fingerprint,
        "num_pairs": plan.num_pairs,
        "sites": result.sites(),
        "k_grid": ks,
        "alpha_grid": alphas,
        "choice_rule": CHOICE_RULE,
        "best": {"site": best.site, "k": best.k, "alpha": best.alpha,
                 "tune_accuracy": result.cells[best].accuracy,
                 "start_layer": result.start_layers[best], "units": edit.to_records(),
                 "cost": result.costs[best].to_dict() if best in result.costs else None},
        "tune": {"split": "tune", "n": result.base.n, "unsteered": result.base.summary(),
                 "sweep_seconds": round(result.seconds, 3), "prefix_resume": result.resumed,
                 "max_kl": max_kl, "grid": result.records()},
        "test": {"split": "test", "n": test_base.n,
                 "unsteered": test_base.summary(), "steered": test_steered.summary(),
                 "gain": test_steered.accuracy - test_base.accuracy,
                 "reports": [TEST_BASE_REPORT, TEST_STEERED_REPORT]},
        "heatmaps": heatmaps,
        "notes": notes,
    }


def parse_grid(text: str, kind: Callable[[str], Any], option: str) -> tuple[Any, ...]:
    """Read a comma-separated grid such as ``2,4,8`` for ``--k-grid`` / ``--alpha-grid``."""
    try:
        values = tuple(kind(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise AufoldError(f"{option} must be comma-separated numbers such as 2,4,8; got "
                          f"{text!r}") from None
    if not values:
        raise AufoldError(f"{option} is empty; give comma-separated numbers such as 2,4,8")
    if any(isinstance(v, float) and not math.isfinite(v) for v in values):
        raise AufoldError(f"{option} values must be finite numbers; got {text!r}")
    return values
