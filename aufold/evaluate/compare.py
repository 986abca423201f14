"""Steering less vs steering more at matched side effects: accuracy against KL, per method.

AUSteer's claim is that a few atomic units beat a whole block at the same task, because
they move fewer unrelated directions. Accuracy alone cannot test it (a stronger edit
can always buy accuracy with fluency), so every method's configurations are placed by
their accuracy *and* their KL on neutral text (:mod:`aufold.evaluate.cost`), and each
method is credited with its best accuracy among the configurations within a KL budget.

Methods, all built from one plan and one site, evaluated on the same items by the same
scorer in one sweep:

- ``austeer``: the top-k units with gamma = alpha * signed score (the plan's selection);
- ``fixed``: the same units, one magnitude for all (:func:`aufold.ablations.fixed_strength`);
- ``random``: k random units of the site with their own gammas (:func:`~aufold.ablations.random_units`);
- ``block``: every unit of the site in the layer that holds most of the top units
  (:func:`~aufold.ablations.block_units`), over its own alpha grid;
- ``caa``: contrastive activation addition (:mod:`aufold.vectors.caa`), the mean residual
  difference of the pairs at one layer (by default the block's) added at every token,
  over a grid of multipliers; given the pairs, since a plan keeps only counts.

Every method's best is chosen on the items it is scored on, an optimistic figure that
is equally optimistic for all of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aufold.ablations import block_units, densest_layer, fixed_strength, random_units
from aufold.edit import Edit
from aufold.encoding import DEFAULT_MAX_LENGTH
from aufold.errors import AufoldError
from aufold.evaluate.cost import NeutralText, edit_costs
from aufold.evaluate.edits import evaluate_edits
from aufold.evaluate.report import EvalResult
from aufold.pairs import ContrastivePair
from aufold.plan import Plan
from aufold.vectors.caa import VectorEdit, caa_vectors
from aufold.vectors.fold import check_scale

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from aufold.tasks import Item, TaskKind

METHODS: tuple[str, ...] = ("austeer", "fixed", "random", "block", "caa")
KL_BUDGETS: tuple[float, ...] = (0.05, 0.1, 0.2)
BLOCK_ALPHAS: tuple[float, ...] = (0.1, 0.5, 1.0, 2.0, 5.0, 10.0)
CAA_MULTIPLIERS: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0)


@dataclass(frozen=True)
class Point:
    """One configuration of one method: what it steers, how well it scores, what it costs."""

    method: str
    setting: str
    units: int
    accuracy: float
    kl: float
    perplexity_ratio: float


@dataclass(frozen=True)
class Comparison:
    """All configurations of all methods, and the unsteered model, on the same items."""

    base: EvalResult
    points: tuple[Point, ...]
    budgets: tuple[float, ...]
    site: str
    block_layer: int
    corpus: str
    tokens: int
    caa_layer: int | None = None  # None when no pairs were given for CAA

    def best_within(self, method: str, budget: float) -> Point | None:
        """The method's most accurate configuration with KL at most ``budget`` (fewer units,
        then less KL, on a tie), or None when none is within it."""
        within = [p for p in self.points if p.method == method and p.kl <= budget]
        return min(within, key=lambda p: (-p.accuracy, p.units, p.kl), default=None)

    @property
    def methods(self) -> tuple[str, ...]:
        """The methods that ran, in :data:`METHODS` order (CAA only with pairs)."""
        ran = {point.method for point in self.points}
        return tuple(method for method in METHODS if method in ran)

    def table(self) -> str:
        """Best accuracy per method (rows) within each KL budget (columns)."""
        head = f"{'method':<8}" + "".join(f"{'KL <= ' + format(b, 'g'):>24}" for b in self.budgets)
        lines = [f"best accuracy within each KL budget (site {self.site}; unsteered "
                 f"{self.base.accuracy:.3f}, n={self.base.n}; KL on {self.corpus}, "
                 f"{self.tokens} tokens)", head]
        for method in self.methods:
            cells = []
            for budget in self.budgets:
                best = self.best_within(method, budget)
                cells.append(f"{best.accuracy:.3f} ({best.setting})" if best else "-")
            lines.append(f"{method:<8}" + "".join(f"{cell:>24}" for cell in cells))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"site": self.site, "block_layer": self.block_layer, "caa_layer": self.caa_layer,
                "budgets": list(self.budgets),
                "neutral": {"corpus": self.corpus, "tokens": self.tokens},
                "unsteered": self.base.summary(),
                "best_within": {str(b): {m: asdict(p) if (p := self.best_within(m, b)) else None
                                         for m in self.methods} for b in self.budgets},
                "points": [asdict(point) for point in self.points]}


def compare_methods(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    plan: Plan,
    items: Sequence[Item],
    neutral: NeutralText,
    *,
    site: str,
    ks: Sequence[int],
    alphas: Sequence[float],
    block_alphas: Sequence[float] = BLOCK_ALPHAS,
    block_layer: int | None = None,
    budgets: Sequence[float] = KL_BUDGETS,
    pairs: Sequence[ContrastivePair] = (),
    caa_multipliers: Sequence[float] = CAA_MULTIPLIERS,
    caa_layer: int | None = None,
    seed: int = 0,
    kind: TaskKind = "choice",
    scorer: str | None = None,
    batch_size: int = 16,
    chat_template: bool = False,
    max_length: int = 2048,
    progress: bool = True,
    allow_extreme: bool = False,
) -> Comparison:
    """Every method over its grid on ``items``, with each configuration's cost on ``neutral``;
    CAA only with ``pairs`` (the pairs the plan was localized on)."""
    if site not in plan.sites:
        raise AufoldError(f"the plan has no site {site!r}; it has {', '.join(plan.sites)}")
    if not ks or not alphas or not block_alphas or not budgets:
        raise AufoldError("give at least one k, alpha, block alpha and KL budget")
    layer = densest_layer(plan, site, max(ks)) if block_layer is None else block_layer
    edits: dict[tuple[str, str], Edit | VectorEdit] = {}
    for k in ks:
        for alpha in alphas:
            setting = f"k={k} a={alpha:g}"
            edits["austeer", setting] = plan.select(k, alpha, [site], allow_extreme=allow_extreme)
            edits["fixed", setting] = fixed_strength(plan, k, alpha, [site])
            edits["random", setting] = random_units(plan, k, alpha, [site], seed)
    for alpha in block_alphas:
        edits["block", f"L{layer} a={alpha:g}"] = block_units(plan, site, layer, alpha,
                                                              allow_extreme=allow_extreme)
    vector_layer = None
    if pairs:
        check_caa_multipliers(caa_multipliers, allow_extreme=allow_extreme)
        vector_layer = layer if caa_layer is None else caa_layer
        # Read as the plan read its pairs: the same length limit and prompt wrapping.
        vectors = caa_vectors(model, tokenizer, pairs, [vector_layer], batch_size=batch_size,
                              max_length=int(plan.settings.get("max_length", DEFAULT_MAX_LENGTH)),
                              chat_template=bool(plan.settings.get("chat_template", chat_template)),
                              progress=progress)
        for multiplier in caa_multipliers:
            edits["caa", f"L{vector_layer} x{multiplier:g}"] = VectorEdit(vectors, multiplier)
    results = evaluate_edits(model, tokenizer, items, edits, kind=kind, scorer=scorer,
                             batch_size=batch_size, chat_template=chat_template,
                             max_length=max_length, progress=progress, desc="compare")
    costs = edit_costs(model, neutral, edits, progress=progress)
    points = tuple(Point(method, setting, len(edits[method, setting]),
                         results.steered[method, setting].accuracy, costs[method, setting].kl,
                         costs[method, setting].perplexity_ratio)
                   for method, setting in edits)
    return Comparison(results.base, points, tuple(budgets), site, layer, neutral.name,
                      next(iter(costs.values())).tokens, vector_layer)


@dataclass(frozen=True)
class CompareOutcome:
    """What `aufold compare` wrote."""

    out: Path
    comparison: Comparison
    plot: Path | None


COMPARE_FILE = "compare.json"


def run_compare(model_ref: str | Path, task: str, *, plan_dir: str | Path, site: str,
                out: str | Path, split: str = "tune", data_dir: str | Path | None = None,
                limit: int | None = None, neutral: str | Path | None = None,
                dtype: str = "auto", device: str | None = None, device_map: str | None = None,
                allow_pickle: bool = False, force: bool = False, overwrite: bool = False,
                plot: bool = True, caa: bool = True, caa_pairs: str | Path | None = None,
                **options: Any) -> CompareOutcome:
    """Load the model and the plan, compare the methods on a task split, and write
    ``out/compare.json`` (and ``out/tradeoff.png`` with matplotlib). CAA's vector comes from
    ``caa_pairs`` (a pairs file), else from the first ``plan.num_pairs`` pairs of the task's
    pairs split: the pairs ``aufold localize --task`` reads; ``caa=False`` leaves it out."""
    from aufold.evaluate.core import resolve_scorer
    from aufold.evaluate.cost import check_neutral, neutral_text
    from aufold.evaluate.report import write_json
    from aufold.modeling import fingerprint, load_model, resolve_source
    from aufold.plotting import matplotlib_available, plot_tradeoff
    from aufold.safety.outputs import Inputs, atomic_folder, claim_output
    from aufold.tasks import get_task, load_split, read_pairs_or_task, resolve_data_dir

    if caa:
        check_caa_multipliers(options.get("caa_multipliers", CAA_MULTIPLIERS),
                              allow_extreme=bool(options.get("allow_extreme")))
    kind = get_task(task).kind
    if kind != "choice":
        raise AufoldError(f"compare scores choice tasks; {task} is a {kind} task")
    check_neutral(neutral, data_dir)
    options["scorer"] = resolve_scorer(kind, options.get("scorer"))
    items = load_split(task, split, data_dir, size=limit)
    inputs = Inputs.of([*resolve_source(model_ref).input_paths(), plan_dir,
                        resolve_data_dir(data_dir), neutral, caa_pairs])
    with claim_output(out, overwrite=overwrite, inputs=inputs) as out_dir:
        plan = Plan.load(plan_dir)
        if site not in plan.sites:
            raise AufoldError(f"the plan has no site {site!r}; it has {', '.join(plan.sites)}")
        pairs = ([] if not caa else read_pairs_or_task(caa_pairs, None, None) if caa_pairs
                 else _plan_pairs(plan, read_pairs_or_task(None, task, data_dir)))
        model, tokenizer, source = load_model(model_ref, dtype=dtype, device=device,
                                              device_map=device_map, sites=(site,),
                                              allow_pickle=allow_pickle)
        plan.check_fingerprint(fingerprint(model), force=force)
        text = neutral_text(tokenizer, file=neutral, data_dir=data_dir)
        comparison = compare_methods(model, tokenizer, plan, items, text, site=site, kind=kind,
                                     pairs=pairs, **options)
        figure = None
        with atomic_folder(out_dir, content="compare") as staging:
            write_json({"format": "aufold-compare", "model": source.ref, "task": task,
                        "split": split, "plan": str(Path(plan_dir).expanduser().resolve()),
                        "caa_pairs": (str(caa_pairs) if caa_pairs else
                                      f"{task} pairs split, first {len(pairs)}") if caa else None,
                        "scorer": options["scorer"], **comparison.to_dict()},
                       staging / COMPARE_FILE)
            if plot and matplotlib_available():
                per_method: dict[str, list[tuple[float, float]]] = {}
                for point in comparison.points:
                    per_method.setdefault(point.method, []).append((point.kl, point.accuracy))
                figure = plot_tradeoff(per_method, staging / "tradeoff.png",
                                       title=f"{task} {split}: accuracy vs KL, site {site}",
                                       base=comparison.base.accuracy, budgets=comparison.budgets)
        return CompareOutcome(out_dir, comparison, out_dir / figure.name if figure else None)


def check_caa_multipliers(multipliers: Sequence[float], *, allow_extreme: bool = False) -> None:
    if not multipliers:
        raise AufoldError("give at least one CAA multiplier, or leave CAA out with --no-caa")
    for multiplier in multipliers:
        check_scale(multiplier, allow_extreme=allow_extreme, option="--caa-multipliers")


def _plan_pairs(plan: Plan, task_pairs: list[ContrastivePair]) -> list[ContrastivePair]:
    """The task pairs ``aufold localize --task`` counts: the first ``plan.num_pairs`` of the
    pairs split (a plan localized on a pairs file needs ``--caa-pairs``); a plan that
    counted more was made from other pairs."""
    if plan.num_pairs > len(task_pairs):
        raise AufoldError(f"CAA's vector needs the pairs the plan was localized on: the plan "
                          f"counted {plan.num_pairs} pairs, but the task's pairs split has "
                          f"{len(task_pairs)}; give them with --caa-pairs FILE, or leave CAA "
                          f"out with --no-caa")
    return task_pairs[:plan.num_pairs]
