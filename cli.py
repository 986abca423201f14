"""The ``aufold`` command line: parses options and calls the library; no logic of its own."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from aufold.encoding import DEFAULT_MAX_LENGTH
from aufold.errors import AufoldError
from aufold.localize import DEFAULT_BATCH_SIZE
from aufold.modeling import DTYPES
from aufold.sites import SITES
from aufold.version import __version__

F = TypeVar("F", bound=Callable[..., Any])

USAGE_ERROR = 2  # bad input, like click's own usage errors
CHECK_FAILED = 1  # the command ran but its check did not pass (verify)


def reports_errors(command: F) -> F:
    """Turn AufoldError into one line on stderr and exit code 2; let real bugs keep tracebacks."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except AufoldError as error:
            click.echo(f"aufold: error: {error}", err=True)
            sys.exit(USAGE_ERROR)

    return wrapper  # type: ignore[return-value]


def selection_options(command: F) -> F:
    """The options that turn a plan into an edit: --plan, --k, --alpha, --site, --force."""
    for option in reversed([
        click.option("--plan", "plan_dir", required=True, type=click.Path(path_type=Path),
                     help="Plan folder written by `aufold localize`."),
        click.option("--k", type=int, required=True, help="Number of top-ranked units to steer."),
        click.option("--alpha", type=float, required=True, help="Strength: gamma = alpha * signed score."),
        click.option("--site", "sites", multiple=True, type=click.Choice(list(SITES)),
                     help="Rank only these sites of the plan (default: all of its sites)."),
        click.option("--force", is_flag=True, help="Use a plan whose model fingerprint differs."),
        dtype_option,
    ]):
        command = option(command)
    return command


dtype_option = click.option("--dtype", default="auto", show_default=True, type=click.Choice(list(DTYPES)),
                            help="Dtype to load the model in (auto: the checkpoint's own).")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="aufold")
def main() -> None:
    """Fine-grained activation steering (AUSteer), folded into model weights.

    MODEL is a hub id, a local model folder, or a .gguf file.
    """


@main.command()
@click.argument("model")
@click.option("--pairs", "pairs_file", required=True, type=click.Path(path_type=Path),
              help="JSONL with prompt, positive and negative per line.")
@click.option("--site", "sites", multiple=True, required=True, type=click.Choice(list(SITES)),
              help="Site to localize; repeat for several.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Plan folder to write.")
@click.option("--batch-size", default=DEFAULT_BATCH_SIZE, show_default=True, type=click.IntRange(min=1))
@click.option("--max-length", default=DEFAULT_MAX_LENGTH, show_default=True, type=click.IntRange(min=2),
              help="Longer texts are cut from the left, keeping the answer.")
@click.option("--chat-template", is_flag=True, help="Wrap each prompt in the tokenizer's chat template.")
@dtype_option
@click.option("--device", default=None, help="Device to run on, e.g. cuda or cpu.")
@click.option("--device-map", default=None, help="Spread a large model over devices, e.g. auto.")
@click.option("--overwrite", is_flag=True, help="Replace an existing non-empty --out.")
@reports_errors
def localize(model: str, pairs_file: Path, sites: tuple[str, ...], out: Path, batch_size: int,
             max_length: int, chat_template: bool, dtype: str, device: str | None,
             device_map: str | None, overwrite: bool) -> None:
    """Rank the atomic units of MODEL by how consistently they separate the pairs."""
    from aufold.atomic import check_output_folder
    from aufold.localize import localize as run_localize
    from aufold.modeling import load_model
    from aufold.pairs import read_pairs

    pairs = read_pairs(pairs_file)
    check_output_folder(out, overwrite=overwrite)
    loaded, tokenizer, source = load_model(model, dtype=dtype, device=device, device_map=device_map)
    plan = run_localize(loaded, tokenizer, pairs, sites, batch_size=batch_size, max_length=max_length,
                        chat_template=chat_template, model_id=source.ref)
    truncated = plan.settings["truncated_texts"]
    if truncated:
        click.echo(f"note: {truncated} text(s) were longer than {max_length} tokens and were cut "
                   f"from the left", err=True)
    plan.save(out, overwrite=overwrite)
    click.echo(f"localized {plan.num_units()} units over {plan.num_pairs} pairs; top units:")
    for unit in plan.ranking(k=10):
        click.echo(f"  {unit.site:<8} layer {unit.layer:>3} unit {unit.unit:>5}  score {unit.score:.3f}"
                   f"  ({unit.direction_word()})")
    click.echo(f"plan written to {out}")


@main.command()
@click.argument("model")
@selection_options
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Checkpoint folder to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing non-empty --out.")
@click.option("--base-model-id", default=None, help="Hub id of the base model for the model card.")
@click.option("--push-to-hub", "repo_id", default=None, help="Also upload the folder to this hub repo.")
@click.option("--private", is_flag=True, help="Create the hub repo as private.")
@reports_errors
def export(model: str, plan_dir: Path, k: int, alpha: float, sites: tuple[str, ...], force: bool,
           dtype: str, out: Path, overwrite: bool, base_model_id: str | None, repo_id: str | None,
           private: bool) -> None:
    """Fold the top-k units of a plan into MODEL and write a standard checkpoint."""
    from aufold.export import export as run_export

    result = run_export(model, plan_dir, k=k, alpha=alpha, out=out, sites=sites or None, dtype=dtype,
                        overwrite=overwrite, force=force, base_model_id=base_model_id,
                        push_to_hub=repo_id, private=private)
    click.echo(f"folded {len(result.edit)} units ({', '.join(result.edit.sites)}) into {result.out}")
    if result.url:
        click.echo(f"pushed to {result.url}")


@main.command()
@click.argument("model")
@selection_options
@click.option("--folded", required=True, type=click.Path(path_type=Path),
              help="Folder written by `aufold export`.")
@click.option("--prompt", "prompts", multiple=True, help="Prompt to compare on (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@reports_errors
def verify(model: str, plan_dir: Path, k: int, alpha: float, sites: tuple[str, ...], force: bool,
           dtype: str, folded: Path, prompts: tuple[str, ...], as_json: bool) -> None:
    """Check that the folded checkpoint computes what MODEL computes with hooks."""
    from aufold.verify import DEFAULT_PROMPTS
    from aufold.verify import verify as run_verify

    report = run_verify(model, plan_dir, k=k, alpha=alpha, folded=folded, sites=sites or None,
                        dtype=dtype, prompts=prompts or DEFAULT_PROMPTS, force=force)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(f"dtype {report.dtype}, {report.tokens} tokens")
        click.echo(f"max |logit diff| {report.max_abs_diff:.3g} (relative {report.relative_diff:.3g}); "
                   f"tolerance {report.tolerance:.3g} [{report.tolerance_rule}]")
        click.echo(f"top-1 agreement {report.top1_agreement:.2%}")
        click.echo("PASS" if report.passed else "FAIL")
    if not report.passed:
        sys.exit(CHECK_FAILED)


@main.command()
@click.argument("model")
@selection_options
@click.option("--prompt", required=True, help="Prompt to complete.")
@click.option("--max-new-tokens", default=40, show_default=True, type=click.IntRange(min=1))
@click.option("--chat-template", is_flag=True, help="Wrap the prompt in the tokenizer's chat template.")
@reports_errors
def generate(model: str, plan_dir: Path, k: int, alpha: float, sites: tuple[str, ...], force: bool,
             dtype: str, prompt: str, max_new_tokens: int, chat_template: bool) -> None:
    """Print MODEL's greedy completion of a prompt without and with steering (hook mode)."""
    from aufold.generate import compare_completions

    plain, steered = compare_completions(model, plan_dir, k=k, alpha=alpha, sites=sites or None,
                                         dtype=dtype, prompt=prompt, max_new_tokens=max_new_tokens,
                                         chat_template=chat_template, force=force)
    click.echo(f"--- unsteered ---\n{plain}\n--- steered (k={k}, alpha={alpha:g}) ---\n{steered}")


@main.command()
@click.option("--out", default=Path("aufold-demo"), show_default=True, type=click.Path(path_type=Path),
              help="Folder for the pairs, plan, folded model and report.")
@click.option("--model", default=None, help="Model to use instead of the packaged SmolLM2-135M-Instruct.")
@click.option("--overwrite", is_flag=True, help="Replace an existing non-empty --out.")
@reports_errors
def demo(out: Path, model: str | None, overwrite: bool) -> None:
    """Run the whole path on SmolLM2-135M-Instruct and a generated addition task."""
    from aufold.demo import run_demo

    report = run_demo(out, model_ref=model, overwrite=overwrite, echo=click.echo)
    check = report.verify
    click.echo(f"verify: max |logit diff| {check['max_abs_diff']:.3g} (relative "
               f"{check['relative_diff']:.3g}), top-1 agreement {check['top1_agreement']:.2%}: "
               f"{'PASS' if check['passed'] else 'FAIL'}")
    click.echo(f"held-out test ({report.test_items} items, log-likelihood of the right sum): "
               f"base {report.test_accuracy_base:.3f} -> folded {report.test_accuracy_folded:.3f}")
    click.echo(f"outputs in {out}")
    if not check["passed"]:
        sys.exit(CHECK_FAILED)


if __name__ == "__main__":
    main()
