"""The ``aufold`` command line: parses options and calls the library; no logic of its own."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

# Only light modules at start-up: `aufold --help` and usage errors must not wait for torch.
# Each command imports what it runs.
from aufold.defaults import (
    ALPHA_GRID,
    DTYPE_NAMES,
    EVAL_BATCH_SIZE,
    EVAL_MAX_LENGTH,
    GGUF_REENCODE,
    GGUF_REENCODE_NAMES,
    K_GRID,
    LOCALIZE_BATCH_SIZE,
    LOCALIZE_MAX_LENGTH,
    MAX_NEW_TOKENS,
    SCORER_NAMES,
    TIE_TOLERANCE,
)
from aufold.errors import AufoldError
from aufold.formats import CHECKPOINT, FORMATS
from aufold.sites import SITES, VECTOR_SITES
from aufold.tasks.base import SPLITS
from aufold.tasks.registry import task_names
from aufold.version import __version__

F = TypeVar("F", bound=Callable[..., Any])


class OutputPath(click.Path):
    """A path to write: an empty one would mean the current folder, so it is refused."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and not value.strip():
            self.fail("is empty; give a file or folder name", param, ctx)
        return super().convert(value, param, ctx)


OUTPUT_PATH = OutputPath(path_type=Path)

USAGE_ERROR = 2  # bad input, like click's own usage errors
CHECK_FAILED = 1  # the command ran but its check did not pass (verify)


def reports_errors(command: F) -> F:
    """Every command's outer layer: --quiet and --verbose, and AufoldError turned into one
    line on stderr and exit code 2 (real bugs keep their tracebacks)."""

    @functools.wraps(command)
    def wrapper(*args: Any, quiet: bool = False, verbose: bool = False, **kwargs: Any) -> Any:
        _configure_console(quiet=quiet, verbose=verbose)
        try:
            return command(*args, **kwargs)
        except AufoldError as error:
            click.echo(f"aufold: error: {error}", err=True)
            sys.exit(USAGE_ERROR)

    wrapper = click.option("--verbose", is_flag=True,
                           help="Also show the warnings of torch, transformers and other libraries.")(wrapper)
    wrapper = click.option("--quiet", "-q", is_flag=True,
                           help="No progress bars or status lines; results and errors still print.")(wrapper)
    return wrapper  # type: ignore[return-value]


def _configure_console(*, quiet: bool, verbose: bool) -> None:
    """Progress on stderr unless --quiet; libraries' warnings and notices only with --verbose."""
    from aufold.progress import set_quiet
    from aufold.safety.limits import forget_warnings

    set_quiet(quiet)
    forget_warnings()
    if quiet:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read by huggingface_hub and transformers
    if not verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        for category in (FutureWarning, UserWarning, DeprecationWarning):
            warnings.filterwarnings("ignore", category=category)
    if "transformers" in sys.modules:  # already imported (the in-process tests): tell it directly
        from transformers.utils import logging as transformers_logging

        if not verbose:
            transformers_logging.set_verbosity_error()
        if quiet:
            transformers_logging.disable_progress_bar()


def guarded(*, inputs: tuple[str, ...] = (), folders: tuple[str, ...] = (),
            files: tuple[str, ...] = ()) -> Callable[[F], F]:
    """Declare which arguments a command reads and which it writes; every output is claimed
    (checked against the inputs, locked, replaced only if aufold wrote it) before the
    command runs, and released when it ends (aufold.safety.guard)."""

    def decorate(command: F) -> F:
        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            from aufold.safety.guard import guarded_outputs

            with guarded_outputs(kwargs, inputs=inputs, folders=folders, files=files):
                return command(**kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


def selection_options(command: F) -> F:
    """The options that choose an edit: --plan with --k and --alpha (and --site), --tuned (the
    tune.json of `aufold tune`) or --recipe; each repeatable to compose several edits (in
    the order given); --force and --allow-extreme. Which of them a command needs,
    aufold.recipe.resolve_recipe checks."""
    for option in reversed([
        click.option("--plan", "plan_dir", multiple=True, type=click.Path(path_type=Path),
                     help="Plan folder written by `aufold localize`; repeat it, each with its "
                          "--k and --alpha, to compose edits."),
        click.option("--k", multiple=True, type=int,
                     help="Number of top-ranked units to steer (one per --plan, or one for all)."),
        click.option("--alpha", multiple=True, type=float,
                     help="Strength: gamma = alpha * signed score (one per --plan, or one for all)."),
        click.option("--site", "sites", multiple=True, type=click.Choice(list(SITES)),
                     help="Rank only these sites of each plan (default: all of its sites)."),
        click.option("--tuned", multiple=True, type=click.Path(path_type=Path),
                     help="tune.json of `aufold tune`: its plan, site, k and alpha (repeatable)."),
        click.option("--recipe", type=click.Path(path_type=Path, dir_okay=False), default=None,
                     help="A JSON or YAML file listing the edits to compose: plan, k, alpha "
                          "(and sites), or tuned, for each."),
        click.option("--force", is_flag=True, help="Use a plan whose model fingerprint differs."),
        allow_extreme_option,
        dtype_option,
    ]):
        command = option(command)
    return command


def device_options(command: F) -> F:
    """Where the model runs: --device (one device) or --device-map (accelerate, for a model
    larger than one device); and --allow-pickle, offered wherever a model loads."""
    command = allow_pickle_option(command)
    command = click.option("--device-map", default=None,
                           help="Spread a model larger than one device over the devices (and CPU "
                                "or disk), e.g. auto; needs accelerate.")(command)
    return click.option("--device", default=None, help="Device to run on, e.g. cuda or cpu.")(command)


def cost_options(command: F) -> F:
    """--no-cost and --neutral: the KL and perplexity of an edit on neutral text."""
    command = click.option(
        "--neutral", default=None, type=click.Path(path_type=Path, dir_okay=False),
        help="Text file to measure an edit's cost on (default: the BoolQ test passages).")(command)
    return click.option(
        "--no-cost", is_flag=True,
        help="Skip measuring the KL divergence and perplexity ratio on neutral text.")(command)


def layer_streaming_options(command: F) -> F:
    """--layer-streaming and --work-dir: run a model larger than memory one layer at a time."""
    command = click.option(
        "--work-dir", default=None, type=click.Path(path_type=Path, file_okay=False),
        help="With layer streaming: a folder for the hidden states when they do not fit in "
             "memory (a file deleted afterwards).")(command)
    return click.option(
        "--layer-streaming", is_flag=True,
        help="Load one decoder layer at a time from a safetensors checkpoint, for a model larger "
             "than memory (chosen by itself when the weights do not fit).")(command)


allow_pickle_option = click.option(
    "--allow-pickle", is_flag=True,
    help="Load a model that has pickle weights (.bin) only; unpickling can run code, so only "
         "for files you trust.")
allow_extreme_option = click.option(
    "--allow-extreme", is_flag=True,
    help="Allow an edit whose scale factors exceed 1000 in size (refused by default: such a "
         "model is almost surely a typo).")
limit_option = click.option("--limit", type=click.IntRange(min=1), default=None,
                            help="Use only the first N items of each split read (pairs, tune, test).")
task_option = click.option("--task", required=True, type=click.Choice(task_names()),
                           help="Built-in task over ../shared/data, or generic (your own JSONL "
                                "files in --data-dir).")
overwrite_option = click.option("--overwrite", is_flag=True,
                                help="Replace an earlier output of aufold at the same path.")
dtype_option = click.option("--dtype", default="auto", show_default=True,
                            type=click.Choice(list(DTYPE_NAMES)),
                            help="Dtype to load the model in (auto: the checkpoint's own).")
data_dir_option = click.option("--data-dir", type=click.Path(path_type=Path), default=None,
                               help="Folder of the task's files (default: ../shared/data beside the "
                                    "repository; for --task generic, the folder of pairs/tune/test.jsonl).")


def pairs_options(command: F) -> F:
    """Where contrastive pairs come from: --pairs FILE, or --task (with --data-dir)."""
    for option in reversed([
        click.option("--pairs", "pairs_file", default=None, type=click.Path(path_type=Path),
                     help="JSONL with prompt, positive and negative per line (or use --task)."),
        click.option("--task", default=None, type=click.Choice(task_names()),
                     help="Use this task's pairs split instead of --pairs."),
        data_dir_option,
    ]):
        command = option(command)
    return command


def pair_reading_options(command: F) -> F:
    """How pairs run through the model: --batch-size, --limit, --max-length, --chat-template."""
    for option in reversed([
        click.option("--batch-size", default=LOCALIZE_BATCH_SIZE, show_default=True,
                     type=click.IntRange(min=1),
                     help="Pairs per forward pass; lower it if memory runs out."),
        limit_option,
        click.option("--max-length", default=LOCALIZE_MAX_LENGTH, show_default=True,
                     type=click.IntRange(min=2),
                     help="Longer texts are cut from the left, keeping the answer."),
        click.option("--chat-template", is_flag=True,
                     help="Wrap each prompt in the tokenizer's chat template."),
    ]):
        command = option(command)
    return command


def eval_options(command: F) -> F:
    """How evaluation runs: --batch-size, --max-length, --max-new-tokens, --chat-template."""
    for option in reversed([
        click.option("--batch-size", default=EVAL_BATCH_SIZE, show_default=True, type=click.IntRange(min=1),
                     help="Items per forward pass; lower it if memory runs out."),
        click.option("--max-length", default=EVAL_MAX_LENGTH, show_default=True,
                     type=click.IntRange(min=1), help="Longer prompts keep their last tokens."),
        click.option("--max-new-tokens", default=MAX_NEW_TOKENS, show_default=True,
                     type=click.IntRange(min=1), help="Generation budget of math tasks."),
        click.option("--chat-template", is_flag=True,
                     help="Wrap each prompt in the tokenizer's chat template (instruct models)."),
    ]):
        command = option(command)
    return command


class _EchoNotes(logging.Handler):
    """aufold's own notes and warnings (aufold.safety, ...) on stderr, one line each; the
    stream is looked up when a note is written, so it follows a redirected stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        kind = "note" if record.levelno <= logging.INFO else record.levelname.lower()
        click.echo(f"aufold: {kind}: {record.getMessage()}", err=True)


def _show_notes() -> None:
    logger = logging.getLogger("aufold")
    if not any(isinstance(handler, _EchoNotes) for handler in logger.handlers):
        logger.addHandler(_EchoNotes())
        logger.setLevel(logging.INFO)
        logger.propagate = False


class OneLineErrors(click.Group):
    """A group whose usage errors are one line, like aufold's own, instead of usage text, and
    whose --help lists each command's whole summary."""

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, self.commands[name].get_short_help_str(limit=500))
                for name in self.list_commands(ctx) if not self.commands[name].hidden]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        from aufold.safety.signals import Terminated, stop_cleanly_on_terminate

        stop_cleanly_on_terminate()
        _show_notes()
        try:
            return super().main(*args, standalone_mode=False, **kwargs)
        except Terminated as stop:
            click.echo(f"aufold: stopped by {stop}; partial outputs were removed", err=True)
            sys.exit(stop.exit_code)
        except click.ClickException as error:
            command = f" {error.ctx.command_path.split(' ', 1)[-1]}" if getattr(error, "ctx", None) else ""
            message = " ".join(error.format_message().split())  # click lists choices on lines
            click.echo(f"aufold: error: {message} (see `aufold{command} --help`)", err=True)
            sys.exit(error.exit_code)
        except click.Abort:
            click.echo("aborted", err=True)
            sys.exit(1)


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="aufold")
def main() -> None:
    """Fine-grained activation steering (AUSteer), folded into model weights.

    MODEL is a hub id, a local model folder, or a .gguf file.
    """


@main.command()
@click.argument("model")
@pairs_options
@click.option("--site", "sites", multiple=True, required=True, type=click.Choice(list(SITES)),
              help="Site to localize; repeat for several.")
@click.option("--out", required=True, type=OUTPUT_PATH, help="Plan folder to write.")
@pair_reading_options
@click.option("--tie-tolerance", default=TIE_TOLERANCE, show_default=True,
              type=click.FloatRange(0, 1, max_open=True),
              help="x_pos - x_neg within this times the activations' RMS counts as a tie (float "
                   "rounding, not signal); 0 compares strictly.")
@dtype_option
@device_options
@click.option("--shard", default=None, metavar="I/N",
              help="Count only part I (from 0) of N of the pairs; add the parts with merge-counts. "
                   "Under torchrun the ranks split the pairs by themselves.")
@layer_streaming_options
@overwrite_option
@reports_errors
@guarded(inputs=("model", "pairs_file", "data_dir"), folders=("out",))
def localize(model: str, pairs_file: Path | None, task: str | None, data_dir: Path | None,
             sites: tuple[str, ...], out: Path, batch_size: int, max_length: int, chat_template: bool,
             tie_tolerance: float, limit: int | None, dtype: str, device: str | None,
             device_map: str | None, allow_pickle: bool, shard: str | None, layer_streaming: bool,
             work_dir: Path | None, overwrite: bool) -> None:
    """Rank the atomic units of MODEL by how consistently they separate the pairs."""
    from aufold.layerwise import load_for_run
    from aufold.shards import is_main_process, localize_pairs, parse_shard, rank_device
    from aufold.tasks import read_pairs_or_task

    pairs = read_pairs_or_task(pairs_file, task, data_dir, limit=limit)
    if shard is not None:
        parse_shard(shard)  # before the model loads, like every other check of the options
    if tie_tolerance != tie_tolerance:  # NaN passes click's range check
        raise AufoldError("--tie-tolerance must be a number in [0, 1), got nan")
    loaded, tokenizer, source = load_for_run(model, layer_streaming=layer_streaming,
                                             work_dir=work_dir, dtype=dtype,
                                             device=rank_device(device), device_map=device_map,
                                             sites=sites, allow_pickle=allow_pickle)
    plan = localize_pairs(loaded, tokenizer, pairs, sites, shard=shard, batch_size=batch_size,
                          max_length=max_length, chat_template=chat_template,
                          tie_tolerance=tie_tolerance, model_id=source.ref)
    if not is_main_process():
        return
    truncated = plan.settings["truncated_texts"]
    if truncated:
        click.echo(f"note: {truncated} text(s) were longer than {max_length} tokens and were cut "
                   f"from the left", err=True)
    if plan.settings["full_text_pairs"]:
        click.echo(f"note: {plan.settings['full_text_pairs']} of {plan.num_pairs} pair(s) ran as two "
                   f"full texts (their prompt's tokens are not a prefix of both texts' tokens, or a "
                   f"text was cut); the others shared their prompt", err=True)
    plan.save(out, overwrite=overwrite)
    if shard is not None:
        index, count = shard.split("/")
        click.echo(f"localized part {index} of {count}: counts over {plan.num_pairs} of the pairs, a "
                   f"partial plan (its ranking is not the whole plan's); when all {count} parts are "
                   f"done, add them with `aufold merge-counts PART0 ... PART{int(count) - 1} --out "
                   f"PLAN`")
        click.echo(f"partial plan written to {out}")
        return
    click.echo(f"localized {plan.num_units()} units over {plan.num_pairs} pairs; top units:")
    for unit in plan.ranking(k=10):
        click.echo(f"  {unit.site:<8} layer {unit.layer:>3} unit {unit.unit:>5}  score {unit.score:.3f}"
                   f"  ({unit.direction_word()})")
    click.echo(f"plan written to {out}")


@main.command()
@click.argument("model")
@pairs_options
@click.option("--layer", "layers", multiple=True, required=True, type=int,
              help="Decoder layer whose output (the residual stream) gets a vector; repeatable.")
@click.option("--out", required=True, type=OUTPUT_PATH,
              help="Vector file to write (.safetensors, one tensor per layer).")
@pair_reading_options
@dtype_option
@device_options
@overwrite_option
@reports_errors
@guarded(inputs=("model", "pairs_file", "data_dir"), files=("out",))
def caa(model: str, pairs_file: Path | None, task: str | None, data_dir: Path | None,
        layers: tuple[int, ...], out: Path, batch_size: int, limit: int | None, max_length: int,
        chat_template: bool, dtype: str, device: str | None, device_map: str | None,
        allow_pickle: bool, overwrite: bool) -> None:
    """Compute CAA steering vectors (the baseline): per layer, the pairs' mean residual
    difference at the last token; fold them with `aufold fold-vector --site residual`."""
    from aufold.modeling import load_model
    from aufold.safety.outputs import write_file
    from aufold.tasks import read_pairs_or_task
    from aufold.vectors.caa import caa_vectors, vectors_bytes

    if out.suffix != ".safetensors":
        raise AufoldError(f"--out {out} must end in .safetensors, the format fold-vector reads")
    pairs = read_pairs_or_task(pairs_file, task, data_dir, limit=limit)
    loaded, tokenizer, _ = load_model(model, dtype=dtype, device=device, device_map=device_map,
                                      allow_pickle=allow_pickle)
    vectors = caa_vectors(loaded, tokenizer, pairs, layers, batch_size=batch_size,
                          max_length=max_length, chat_template=chat_template)
    write_file(out, vectors_bytes(vectors))
    norms = ", ".join(f"layer {layer}: {float(vectors.vectors[layer].norm()):.4g}"
                      for layer in vectors.layers)
    click.echo(f"CAA vectors over {len(pairs)} pairs ({norms}) written to {out}")


@main.command("merge-counts")
@click.argument("parts", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=OUTPUT_PATH, help="Plan folder to write.")
@overwrite_option
@reports_errors
@guarded(inputs=("parts",), folders=("out",))
def merge_counts(parts: tuple[Path, ...], out: Path, overwrite: bool) -> None:
    """Add the partial plans of `aufold localize --shard I/N` (all N parts) into one plan."""
    from aufold.plan import Plan
    from aufold.shards import merge_counts as run_merge

    plan = run_merge([Plan.load(part) for part in parts])
    plan.save(out, overwrite=overwrite)
    click.echo(f"merged {len(parts)} parts: {plan.num_pairs} pairs, {plan.num_units()} units; "
               f"plan written to {out}")


@main.command()
@click.argument("plan_dir", metavar="PLAN", type=click.Path(path_type=Path))
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True,
              help="How many ranked units to list.")
@click.option("--all", "list_all", is_flag=True, help="List every unit (overrides --limit).")
@click.option("--site", "sites", multiple=True, type=click.Choice(list(SITES)),
              help="Only these sites of the plan (ranked together, as an export ranks them).")
@click.option("--layer", type=int, default=None, help="Only units of this layer.")
@click.option("--k", type=int, default=None, help="With --alpha: show the gammas of the top k.")
@click.option("--alpha", type=float, default=None, help="With --k: the strength of the edit.")
@click.option("--json", "as_json", is_flag=True, help="Print the view as JSON.")
@click.option("--plot", type=OUTPUT_PATH, default=None,
              help="Also write the unit map (score of every unit over layers; the listed units "
                   "circled) as a PNG file.")
@overwrite_option
@reports_errors
@guarded(inputs=("plan_dir",), files=("plot",))
def inspect(plan_dir: Path, limit: int, list_all: bool, sites: tuple[str, ...], layer: int | None,
            k: int | None, alpha: float | None, as_json: bool, plot: Path | None,
            overwrite: bool) -> None:
    """List a plan's ranked units, where they sit, and the gammas an export would fold."""
    from aufold.inspection import view_plan
    from aufold.plan import Plan

    plan = Plan.load(plan_dir)
    view = view_plan(plan, sites=sites, layer=layer, limit=None if list_all else limit, k=k,
                     alpha=alpha)
    if plot is not None:
        from aufold.plotting import plot_unit_scores

        circled = [(unit.site, unit.layer, unit.unit) for _, unit in view.units]
        plot_unit_scores({site: plan.scores(site) for site in view.sites}, circled, plot,
                         title=f"{plan.model}: unit scores over {plan.num_pairs} pairs, "
                               f"{len(circled)} listed units circled")
    if as_json:
        click.echo(json.dumps(view.to_dict(), indent=2))
        return
    click.echo(f"plan of {plan.model}: {plan.num_pairs} pairs; sites "
               + ", ".join(f"{site} ({plan.counts[site].positive.shape[0]} layers x "
                           f"{plan.counts[site].positive.shape[1]} units)" for site in view.sites))
    gammas = view.k is not None
    click.echo(f"{'rank':>6}  {'site':<8}{'layer':>6}{'unit':>7}{'r_pos':>8}{'r_neg':>8}{'score':>8}"
               f"  direction" + ("    gamma" if gammas else ""))
    for rank, unit in view.units:
        gamma = view.gamma(rank, unit)
        click.echo(f"{rank:>6}  {unit.site:<8}{unit.layer:>6}{unit.unit:>7}{unit.r_pos:>8.3f}"
                   f"{unit.r_neg:>8.3f}{unit.score:>8.3f}  {unit.direction_word():<9}"
                   + (f"{gamma:>+9.3f}" if gamma is not None else ""))
    click.echo(f"where the {len(view.units)} listed units sit (units per layer):")
    click.echo(f"{'layer':>7}" + "".join(f"{site:>9}" for site in view.sites))
    for row_layer, row in view.placement().items():
        click.echo(f"{row_layer:>7}" + "".join(f"{row[site]:>9}" for site in view.sites))
    if plot is not None:
        click.echo(f"unit map written to {plot}")


@main.command()
@click.argument("model")
@selection_options
@click.option("--out", default=None, type=OUTPUT_PATH,
              help="Folder to write: the checkpoint, the adapter or the GGUF file, with card. "
                   "Optional with --push-to-hub, which then keeps no local copy.")
@click.option("--format", "output_format", default=CHECKPOINT, show_default=True,
              type=click.Choice(list(FORMATS)),
              help="checkpoint: full folded model; lora / ia3: exact PEFT adapter; gguf: fold into "
                   "a copy of MODEL's .gguf file.")
@click.option("--gguf-reencode", default=None, type=click.Choice(list(GGUF_REENCODE_NAMES)),
              help=f"With --format gguf: the type a block-quantized tensor whose columns are "
                   f"steered (head units; mlp units of an ungated MLP) is re-encoded to "
                   f"[default: {GGUF_REENCODE}]. Row units (mlp-out, mlp of a gated MLP) "
                   f"scale block scales and keep the type.")
@overwrite_option
@click.option("--base-model-id", default=None, help="Hub id of the base model for the model card.")
@click.option("--push-to-hub", "repo_id", default=None, help="Also upload the folder to this hub repo.")
@click.option("--private", is_flag=True, help="Create the hub repo as private.")
@click.option("--link-unchanged", is_flag=True,
              help="Hard-link shards that hold no edit instead of copying them (same file system; "
                   "the output then shares those files with the input).")
@allow_pickle_option
@cost_options
@reports_errors
@guarded(inputs=("model", "plan_dir", "tuned", "recipe", "neutral"), folders=("out",))
def export(model: str, plan_dir: tuple[Path, ...], k: tuple[int, ...],
           alpha: tuple[float, ...], sites: tuple[str, ...], tuned: tuple[Path, ...],
           recipe: Path | None, force: bool, allow_extreme: bool, dtype: str,
           out: Path | None, output_format: str, gguf_reencode: str | None, overwrite: bool,
           base_model_id: str | None, repo_id: str | None, private: bool, link_unchanged: bool,
           allow_pickle: bool, no_cost: bool, neutral: Path | None) -> None:
    """Fold the top-k units of a plan (or the choice of `aufold tune`, or several composed) into
    MODEL and write a standard checkpoint (or --format)."""
    from aufold.export import export as run_export
    from aufold.recipe import resolve_recipe

    chosen = resolve_recipe(plan_dirs=plan_dir, ks=k, alphas=alpha, sites=sites, tuned=tuned,
                            recipe=recipe, required=True, allow_extreme=allow_extreme)
    assert chosen is not None
    result = run_export(model, chosen, out=out, dtype=dtype, overwrite=overwrite, force=force,
                        base_model_id=base_model_id, push_to_hub=repo_id, private=private,
                        link_unchanged=link_unchanged, allow_pickle=allow_pickle,
                        allow_extreme=allow_extreme, format=output_format,
                        gguf_reencode=gguf_reencode, cost=not no_cost, neutral=neutral)
    if result.streamed:
        click.echo(result.streamed.summary())
    written = "folded" if output_format == CHECKPOINT else f"wrote as {output_format}"
    where = result.out if out is not None else "a temporary folder"
    click.echo(f"{written} {len(result.edit)} units ({', '.join(result.edit.sites)}) into {where}")
    if result.url:
        click.echo(f"pushed to {result.url}")


@main.command()
@click.argument("model")
@selection_options
@click.option("--folded", required=True, type=click.Path(path_type=Path),
              help="Folder written by `aufold export`.")
@click.option("--prompt", "prompts", multiple=True, help="Prompt to compare on (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@device_options
@reports_errors
def verify(model: str, plan_dir: tuple[Path, ...], k: tuple[int, ...],
           alpha: tuple[float, ...], sites: tuple[str, ...], tuned: tuple[Path, ...],
           recipe: Path | None, force: bool, allow_extreme: bool, dtype: str,
           folded: Path, prompts: tuple[str, ...], as_json: bool, device: str | None,
           device_map: str | None, allow_pickle: bool) -> None:
    """Check that the folded checkpoint computes what MODEL computes with hooks."""
    from aufold.recipe import resolve_recipe
    from aufold.verify import DEFAULT_PROMPTS
    from aufold.verify import verify as run_verify

    chosen = resolve_recipe(plan_dirs=plan_dir, ks=k, alphas=alpha, sites=sites, tuned=tuned,
                            recipe=recipe, required=True, allow_extreme=allow_extreme)
    assert chosen is not None
    report = run_verify(model, chosen, folded=folded, dtype=dtype, prompts=prompts or DEFAULT_PROMPTS,
                        force=force, device=device, device_map=device_map,
                        allow_pickle=allow_pickle, allow_extreme=allow_extreme)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(f"dtype {report.dtype}, {report.tokens} tokens")
        click.echo(f"max |logit diff| fold vs hooks {report.max_abs_diff:.3g} (relative "
                   f"{report.relative_diff:.3g})")
        if report.fold_distance is not None:
            click.echo(f"RMS distance to the float32 steered model: fold {report.fold_distance:.3g}, "
                       f"hooks {report.hook_distance:.3g}")
            click.echo(f"tolerance on the fold's distance {report.tolerance:.3g} "
                       f"[{report.tolerance_rule}]")
        else:
            click.echo(f"tolerance {report.tolerance:.3g} [{report.tolerance_rule}]")
        click.echo(f"top-1 agreement {report.top1_agreement:.2%}")
        click.echo("PASS" if report.passed else "FAIL")
    if not report.passed:
        sys.exit(CHECK_FAILED)


@main.command()
@click.argument("model")
@selection_options
@click.option("--prompt", required=True, help="Prompt to complete.")
@click.option("--max-new-tokens", default=40, show_default=True, type=click.IntRange(min=1),
              help="Tokens to generate for each completion.")
@click.option("--chat-template", is_flag=True, help="Wrap the prompt in the tokenizer's chat template.")
@device_options
@reports_errors
def generate(model: str, plan_dir: tuple[Path, ...], k: tuple[int, ...],
             alpha: tuple[float, ...], sites: tuple[str, ...], tuned: tuple[Path, ...],
             recipe: Path | None, force: bool, allow_extreme: bool, dtype: str,
             prompt: str, max_new_tokens: int, chat_template: bool, device: str | None,
             device_map: str | None, allow_pickle: bool) -> None:
    """Print MODEL's greedy completion of a prompt without and with steering (hook mode)."""
    from aufold.generate import compare_completions
    from aufold.recipe import resolve_recipe

    chosen = resolve_recipe(plan_dirs=plan_dir, ks=k, alphas=alpha, sites=sites, tuned=tuned,
                            recipe=recipe, required=True, allow_extreme=allow_extreme)
    assert chosen is not None
    plain, steered = compare_completions(model, chosen, dtype=dtype, prompt=prompt,
                                         max_new_tokens=max_new_tokens, chat_template=chat_template,
                                         force=force, device=device, device_map=device_map,
                                         allow_pickle=allow_pickle, allow_extreme=allow_extreme)
    click.echo(f"--- unsteered ---\n{plain}\n--- steered ({chosen.label()}) ---\n{steered}")


@main.command("fold-vector")
@click.argument("model")
@click.option("--vector", "vector_path", required=True, type=click.Path(path_type=Path),
              help="Per-layer vectors: a repeng/llama.cpp .gguf control vector, a .safetensors or "
                   ".json file, or a folder of per-layer files (CAA layout).")
@click.option("--site", default="residual", show_default=True, type=click.Choice(list(VECTOR_SITES)),
              help="Where the vectors are added: the residual stream after each layer, or the "
                   "attention / MLP output.")
@click.option("--scale", type=float, default=1.0, show_default=True,
              help="Multiplier of the vectors (repeng's coeff).")
@click.option("--out", required=True, type=OUTPUT_PATH, help="Checkpoint folder to write.")
@overwrite_option
@click.option("--base-model-id", default=None, help="Hub id of the base model for the model card.")
@dtype_option
@allow_pickle_option
@allow_extreme_option
@reports_errors
@guarded(inputs=("model", "vector_path"), folders=("out",))
def fold_vector(model: str, vector_path: Path, site: str, scale: float, out: Path, overwrite: bool,
                base_model_id: str | None, dtype: str, allow_pickle: bool, allow_extreme: bool) -> None:
    """Fold additive steering vectors into MODEL's biases and write a standard checkpoint."""
    from aufold.vectors.export import fold_vector_checkpoint

    result = fold_vector_checkpoint(model, vector_path, out=out, site=site, scale=scale, dtype=dtype,
                                    overwrite=overwrite, base_model_id=base_model_id,
                                    allow_pickle=allow_pickle, allow_extreme=allow_extreme)
    flags = f"; switched on {', '.join(result.fold.flags)}" if result.fold.flags else ""
    click.echo(f"folded {len(result.fold.modules)} vectors ({site}, scale {scale:g}) into biases "
               f"of {result.out}{flags}")


@main.command("eval")
@click.argument("model")
@task_option
@click.option("--split", default="test", show_default=True, type=click.Choice(list(SPLITS)),
              help="Which fixed split to evaluate on.")
@data_dir_option
@click.option("--scorer", default=None, type=click.Choice(list(SCORER_NAMES)),
              help="first-token (the authors' protocol) or loglik for choice tasks; math tasks "
                   "generate. Default: first-token, or math for math tasks.")
@selection_options
@limit_option
@eval_options
@device_options
@layer_streaming_options
@cost_options
@click.option("--report", type=OUTPUT_PATH, default=None,
              help="JSON report to write, with every item's prediction.")
@overwrite_option
@reports_errors
@guarded(inputs=("model", "data_dir", "plan_dir", "tuned", "recipe", "neutral"), files=("report",))
def evaluate(model: str, task: str, split: str, data_dir: Path | None, scorer: str | None,
             plan_dir: tuple[Path, ...], k: tuple[int, ...], alpha: tuple[float, ...],
             sites: tuple[str, ...], tuned: tuple[Path, ...], recipe: Path | None, force: bool, allow_extreme: bool, dtype: str, limit: int | None,
             batch_size: int, max_length: int, max_new_tokens: int, chat_template: bool,
             device: str | None, device_map: str | None, allow_pickle: bool,
             layer_streaming: bool, work_dir: Path | None, no_cost: bool, neutral: Path | None,
             report: Path | None, overwrite: bool) -> None:
    """Evaluate MODEL on a task split; with an edit (--plan, --tuned or --recipe), unsteered and
    steered side by side."""
    from aufold.evaluate import evaluate_model
    from aufold.recipe import resolve_recipe

    chosen = resolve_recipe(plan_dirs=plan_dir, ks=k, alphas=alpha, sites=sites, tuned=tuned,
                            recipe=recipe, allow_extreme=allow_extreme)
    evaluation = evaluate_model(model, task, split, recipe=chosen, scorer=scorer,
                                data_dir=data_dir, limit=limit, dtype=dtype, device=device,
                                device_map=device_map, force=force, report=report,
                                overwrite=overwrite, allow_pickle=allow_pickle,
                                layer_streaming=layer_streaming, work_dir=work_dir,
                                cost=not no_cost, neutral=neutral,
                                batch_size=batch_size, chat_template=chat_template,
                                max_length=max_length, max_new_tokens=max_new_tokens)
    result, unsteered = evaluation.result, evaluation.unsteered
    click.echo(f"{task} {split} ({result.scorer}, {result.n} items)")
    if unsteered is None:
        click.echo(f"  unsteered  {result.summary_line()}")
    else:
        assert chosen is not None and evaluation.gain is not None
        steered = f"steered ({chosen.label()})"
        width = len(steered)
        click.echo(f"  {'unsteered'.ljust(width)}  {unsteered.summary_line()}")
        click.echo(f"  {steered}  {result.summary_line()}")
        click.echo(f"  {'difference'.ljust(width)}  {evaluation.gain:+.4f} "
                   f"({result.correct - unsteered.correct:+d} items)")
        if evaluation.cost is not None:
            click.echo(f"  {'cost'.ljust(width)}  {evaluation.cost.line()}")
    if result.settings["truncated_prompts"]:
        click.echo(f"note: {result.settings['truncated_prompts']} prompt(s) were longer than "
                   f"{max_length} tokens and kept their last tokens", err=True)
    if report is not None:
        click.echo(f"report written to {report}")


@main.command()
@click.argument("model")
@task_option
@click.option("--site", "sites", multiple=True, type=click.Choice(list(SITES)),
              help="Site to tune; repeat for several (default: the --plan's sites).")
@click.option("--plan", "plan_dir", type=click.Path(path_type=Path), default=None,
              help="Use this plan instead of localizing on the task's pairs split.")
@click.option("--out", required=True, type=OUTPUT_PATH,
              help="Folder for tune.json, the test reports, the plan and the heatmaps.")
@click.option("--k-grid", default=",".join(map(str, K_GRID)), show_default=True, help="Values of k.")
@click.option("--alpha-grid", default=",".join(f"{a:g}" for a in ALPHA_GRID), show_default=True,
              help="Values of alpha.")
@data_dir_option
@click.option("--scorer", default=None, type=click.Choice(list(SCORER_NAMES)),
              help="As for `aufold eval`; default first-token, or math for math tasks.")
@limit_option
@click.option("--pairs-size", type=int, default=None,
              help="Localize on the first N pairs only (overrides --limit).")
@click.option("--tune-size", type=int, default=None,
              help="Sweep on the first N tune items only (overrides --limit).")
@click.option("--test-size", type=int, default=None,
              help="Report on the first N test items only (overrides --limit).")
@eval_options
@dtype_option
@device_options
@layer_streaming_options
@cost_options
@click.option("--max-kl", type=float, default=None,
              help="Choose only among configurations whose KL on neutral text is at most this "
                   "(nats per token).")
@click.option("--force", is_flag=True, help="Use a plan whose model fingerprint differs.")
@allow_extreme_option
@overwrite_option
@click.option("--no-plot", is_flag=True, help="Skip the heatmaps (they need matplotlib).")
@reports_errors
@guarded(inputs=("model", "plan_dir", "data_dir", "neutral"), folders=("out",))
def tune(model: str, task: str, sites: tuple[str, ...], plan_dir: Path | None, out: Path, k_grid: str,
         alpha_grid: str, data_dir: Path | None, scorer: str | None, limit: int | None,
         pairs_size: int | None, tune_size: int | None, test_size: int | None, batch_size: int,
         max_length: int,
         max_new_tokens: int, chat_template: bool, dtype: str, device: str | None,
         device_map: str | None, allow_pickle: bool, layer_streaming: bool, work_dir: Path | None,
         no_cost: bool, neutral: Path | None, max_kl: float | None, force: bool,
         allow_extreme: bool, overwrite: bool, no_plot: bool) -> None:
    """Sweep alpha x k per site on the tune split, pick the best, evaluate it once on test."""
    from aufold.tune import parse_grid
    from aufold.tune import tune as run_tune

    outcome = run_tune(model, task, out=out, sites=sites, plan_dir=plan_dir,
                       ks=parse_grid(k_grid, int, "--k-grid"),
                       alphas=parse_grid(alpha_grid, float, "--alpha-grid"), scorer=scorer,
                       data_dir=data_dir,
                       pairs_size=pairs_size or (limit if plan_dir is None else None),
                       tune_size=tune_size or limit, test_size=test_size or limit,
                       batch_size=batch_size, chat_template=chat_template,
                       max_length=max_length, max_new_tokens=max_new_tokens, dtype=dtype,
                       device=device, device_map=device_map, force=force, overwrite=overwrite,
                       plot=not no_plot, echo=click.echo, allow_pickle=allow_pickle,
                       allow_extreme=allow_extreme, layer_streaming=layer_streaming,
                       work_dir=work_dir, cost=not no_cost, neutral=neutral, max_kl=max_kl)
    for site in outcome.sweep.sites():
        click.echo(outcome.sweep.table(site))
    best = outcome.record["best"]
    click.echo(f"best on tune: {outcome.best.label()} (tune accuracy {best['tune_accuracy']:.4f}, "
               f"unsteered {outcome.sweep.base.accuracy:.4f})")
    if outcome.best in outcome.sweep.costs:
        click.echo(f"its cost on neutral text: {outcome.sweep.costs[outcome.best].line()}")
    click.echo(f"test, unsteered: {outcome.test_base.summary_line()}")
    click.echo(f"test, steered:   {outcome.test_steered.summary_line()}; gain "
               f"{outcome.record['test']['gain']:+.4f}")
    for note in outcome.notes:
        click.echo(f"note: {note}", err=True)
    click.echo(f"results in {outcome.out} (export with --tuned {outcome.out / 'tune.json'})")


@main.command()
@click.argument("model")
@task_option
@click.option("--plan", "plan_dir", required=True, type=click.Path(path_type=Path),
              help="Plan folder written by `aufold localize` (or a tune run's plan).")
@click.option("--site", required=True, type=click.Choice(list(SITES)), help="Site to compare on.")
@click.option("--out", required=True, type=OUTPUT_PATH,
              help="Folder for compare.json and the accuracy-vs-KL plot.")
@click.option("--split", default="tune", show_default=True, type=click.Choice(list(SPLITS)),
              help="Split every method is scored (and its best chosen) on.")
@click.option("--k-grid", default="8,32,100", show_default=True, help="Values of k.")
@click.option("--alpha-grid", default="1,5,20,50", show_default=True, help="Values of alpha.")
@click.option("--block-alpha-grid", default="0.1,0.5,1,2,5,10", show_default=True,
              help="Values of alpha for the block baseline (every unit of one layer).")
@click.option("--block-layer", type=int, default=None,
              help="Layer of the block baseline (default: the one holding most top units).")
@click.option("--caa-multipliers", default="0.5,1,2,4,8", show_default=True,
              help="Multipliers of the CAA baseline's vector (the pairs' mean residual difference).")
@click.option("--caa-layer", type=int, default=None,
              help="Layer whose residual CAA steers (default: the block baseline's layer).")
@click.option("--caa-pairs", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Pairs file for CAA's vector (default: the task's pairs split, as many as the "
                   "plan counted).")
@click.option("--no-caa", is_flag=True, help="Leave the CAA baseline out.")
@click.option("--budgets", default="0.05,0.1,0.2", show_default=True,
              help="KL budgets (nats per token) to compare the methods' best accuracies at.")
@click.option("--seed", default=0, show_default=True, help="Seed of the random-units baseline.")
@data_dir_option
@click.option("--scorer", default=None, type=click.Choice(list(SCORER_NAMES)),
              help="As for `aufold eval`; choice tasks only.")
@limit_option
@click.option("--neutral", default=None, type=click.Path(path_type=Path, dir_okay=False),
              help="Text file to measure KL on (default: the BoolQ test passages).")
@click.option("--batch-size", default=EVAL_BATCH_SIZE, show_default=True, type=click.IntRange(min=1),
              help="Items per forward pass; lower it if memory runs out.")
@click.option("--max-length", default=EVAL_MAX_LENGTH, show_default=True,
              type=click.IntRange(min=1), help="Longer prompts keep their last tokens.")
@click.option("--chat-template", is_flag=True,
              help="Wrap each prompt in the tokenizer's chat template (instruct models).")
@dtype_option
@device_options
@click.option("--force", is_flag=True, help="Use a plan whose model fingerprint differs.")
@allow_extreme_option
@overwrite_option
@click.option("--no-plot", is_flag=True, help="Skip the accuracy-vs-KL plot (it needs matplotlib).")
@reports_errors
@guarded(inputs=("model", "plan_dir", "data_dir", "neutral", "caa_pairs"), folders=("out",))
def compare(model: str, task: str, plan_dir: Path, site: str, out: Path, split: str, k_grid: str,
            alpha_grid: str, block_alpha_grid: str, block_layer: int | None,
            caa_multipliers: str, caa_layer: int | None, caa_pairs: Path | None, no_caa: bool,
            budgets: str,
            seed: int, data_dir: Path | None, scorer: str | None, limit: int | None,
            neutral: Path | None, batch_size: int, max_length: int, chat_template: bool,
            dtype: str, device: str | None, device_map: str | None, allow_pickle: bool,
            force: bool, allow_extreme: bool, overwrite: bool, no_plot: bool) -> None:
    """Compare AUSteer with steering whole blocks, random units, one fixed strength and CAA at
    matched KL on neutral text: each method's best accuracy within each budget."""
    from aufold.evaluate.compare import run_compare
    from aufold.tune import parse_grid

    if no_caa and (caa_pairs is not None or caa_layer is not None
                   or caa_multipliers != "0.5,1,2,4,8"):
        raise AufoldError("--no-caa leaves CAA out; drop the --caa-* options with it")

    outcome = run_compare(model, task, plan_dir=plan_dir, site=site, out=out, split=split,
                          ks=parse_grid(k_grid, int, "--k-grid"),
                          alphas=parse_grid(alpha_grid, float, "--alpha-grid"),
                          block_alphas=parse_grid(block_alpha_grid, float, "--block-alpha-grid"),
                          block_layer=block_layer, budgets=parse_grid(budgets, float, "--budgets"),
                          caa=not no_caa, caa_pairs=caa_pairs, caa_layer=caa_layer,
                          caa_multipliers=parse_grid(caa_multipliers, float, "--caa-multipliers"),
                          seed=seed, data_dir=data_dir, scorer=scorer, limit=limit,
                          neutral=neutral, batch_size=batch_size, max_length=max_length,
                          chat_template=chat_template, dtype=dtype, device=device,
                          device_map=device_map, allow_pickle=allow_pickle, force=force,
                          allow_extreme=allow_extreme, overwrite=overwrite, plot=not no_plot)
    click.echo(outcome.comparison.table())
    click.echo(f"results in {outcome.out}")


@main.command()
@click.option("--out", default=Path("aufold-demo"), show_default=True, type=OUTPUT_PATH,
              help="Folder for the pairs, plan, folded model and report.")
@click.option("--model", default=None, help="Model to use instead of the packaged SmolLM2-135M-Instruct.")
@overwrite_option
@click.option("--device", default=None, help="Device to run on, e.g. cuda or cpu.")
@allow_pickle_option
@reports_errors
@guarded(inputs=("model",), folders=("out",))
def demo(out: Path, model: str | None, overwrite: bool, device: str | None, allow_pickle: bool) -> None:
    """Run the whole path on SmolLM2-135M-Instruct and a generated addition task."""
    from aufold.demo import run_demo
    from aufold.progress import status

    report = run_demo(out, model_ref=model, overwrite=overwrite, echo=status, device=device,
                      allow_pickle=allow_pickle)
    check = report.verify
    click.echo(f"verify: max |logit diff| {check['max_abs_diff']:.3g} (relative "
               f"{check['relative_diff']:.3g}), top-1 agreement {check['top1_agreement']:.2%}: "
               f"{'PASS' if check['passed'] else 'FAIL'}")
    click.echo(f"held-out test ({report.test_items} items, log-likelihood of the right sum): "
               f"base {report.test_accuracy_base:.3f} -> folded {report.test_accuracy_folded:.3f}")
    figures = f"; figures: {', '.join(report.figures)}" if report.figures else ""
    click.echo(f"outputs in {out}{figures}")
    if not check["passed"]:
        sys.exit(CHECK_FAILED)


if __name__ == "__main__":
    main()
