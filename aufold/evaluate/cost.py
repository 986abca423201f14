"""What an edit costs on text it was not meant for: KL divergence and perplexity on neutral text.

Accuracy on the target task says what an edit gains; this says what it moves
elsewhere. On a fixed neutral corpus, for every position that predicts a next token:

- ``kl``: the mean KL(base || steered) of the two next-token distributions, in nats;
- ``perplexity_ratio``: the steered model's perplexity on the corpus over the base
  model's, exp(mean NLL steered - mean NLL base).

The default corpus is the passages of the BoolQ test split from ``../shared/data``
(Wikipedia paragraphs: plain prose, not the prompt format of any task; for BoolQ
itself they are the passages its test prompts quote, so give another ``--neutral``
file where that matters), joined by blank lines in file order and cut to
:data:`~aufold.defaults.NEUTRAL_TOKENS` tokens in windows of
:data:`~aufold.defaults.NEUTRAL_WINDOW`, each window starting with the tokens the
tokenizer puts before every text (a BOS token where the model has one), as the
scored prompts do. ``--neutral FILE`` takes any local text file instead. The LM head
is applied to a few positions at a time, so memory stays flat whatever the vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from aufold.defaults import NEUTRAL_TOKENS, NEUTRAL_WINDOW
from aufold.edit import Edit
from aufold.errors import AufoldError, first_line
from aufold.progress import bar as progress_bar
from aufold.steer import steer

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from aufold.vectors.caa import VectorEdit

Key = TypeVar("Key", bound=Hashable)
HEAD_CHUNK = 64  # positions per LM-head call: [batch, 64, vocab] float32 at a time
DEFAULT_CORPUS = "BoolQ test-split passages"


@dataclass(frozen=True)
class NeutralText:
    """The token windows of a neutral corpus, and where they came from."""

    name: str
    windows: tuple[tuple[int, ...], ...]

    @property
    def tokens(self) -> int:
        return sum(len(window) for window in self.windows)


@dataclass(frozen=True)
class EditCost:
    """An edit's side effect on the neutral corpus."""

    kl: float  # mean KL(base || steered) per predicted token, nats
    perplexity_ratio: float  # steered perplexity / base perplexity
    corpus: str
    tokens: int  # predicted positions averaged over

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        return (f"KL {self.kl:.4f} nats/token, perplexity x{self.perplexity_ratio:.4f} "
                f"({self.corpus}, {self.tokens} tokens)")


@dataclass(frozen=True)
class CostRequest:
    """Whether an export measures its edit's cost, and on what: ``neutral`` (a text file) or
    the default corpus, read from ``data_dir`` or ``../shared/data``."""

    enabled: bool = True
    neutral: Path | None = None
    data_dir: Path | None = None

    def check(self) -> None:
        """Refuse a named corpus that cannot be read, before any work. A missing default
        corpus only leaves the cost unmeasured (:meth:`unmeasured` says why)."""
        if self.enabled and self.neutral is not None:
            check_neutral(self.neutral, self.data_dir)

    def unmeasured(self) -> str | None:
        """Why the cost will not be measured, or None when it will be."""
        if not self.enabled:
            return "skipped with --no-cost"
        if self.neutral is None:
            try:
                _boolq_file(self.data_dir)
            except AufoldError:
                return (f"the default corpus ({DEFAULT_CORPUS} of ../shared/data) is not here; "
                        f"give one with --neutral FILE")
        return None


@dataclass(frozen=True)
class MeasuredCost:
    """What an export's card says about the cost: the measurement, or why there is none."""

    cost: EditCost | None
    reason: str = ""  # why it was not measured

    def to_dict(self) -> dict[str, Any]:
        if self.cost is None:
            return {"measured": False, "reason": self.reason}
        return {"measured": True, **self.cost.to_dict()}

    def card_rows(self) -> str:
        """Rows of the card's settings table."""
        if self.cost is None:
            return f"| cost on neutral text | not measured: {self.reason} |"
        return (f"| KL(base \\|\\| steered) on neutral text | {self.cost.kl:.4g} nats/token |\n"
                f"| perplexity ratio (steered / base) | {self.cost.perplexity_ratio:.4f} |\n"
                f"| neutral corpus | {self.cost.corpus}, {self.cost.tokens} tokens |")


def measure_cost(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, edit: Edit,
                 request: CostRequest, *, progress: bool = True) -> MeasuredCost:
    """The edit's cost on the requested corpus, with hooks on the unedited ``model``."""
    reason = request.unmeasured()
    if reason is not None:
        return MeasuredCost(None, reason)
    text = neutral_text(tokenizer, file=request.neutral, data_dir=request.data_dir)
    return MeasuredCost(edit_costs(model, text, {0: edit}, progress=progress)[0])


def neutral_text(tokenizer: PreTrainedTokenizerBase, *, file: str | Path | None = None,
                 data_dir: str | Path | None = None, tokens: int = NEUTRAL_TOKENS,
                 window: int = NEUTRAL_WINDOW) -> NeutralText:
    """The neutral corpus as token windows: ``file``'s text, else the BoolQ test passages."""
    if tokens < 2 or window < 2:
        raise AufoldError("the neutral corpus needs at least 2 tokens per window")
    if file is not None:
        path = Path(file).expanduser()
        try:
            texts = [path.read_text(encoding="utf-8")]
        except (OSError, UnicodeDecodeError) as error:
            raise AufoldError(f"cannot read the neutral text {path}: {error}; give a UTF-8 "
                              f"text file") from None
        name = str(path)
    else:
        texts, name = _boolq_passages(data_dir), DEFAULT_CORPUS
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(("\n\n" if ids else "") + text, add_special_tokens=False)["input_ids"]
        if len(ids) >= tokens:
            break
    ids = ids[:tokens]
    if len(ids) < 2:
        raise AufoldError(f"the neutral text {name} has fewer than 2 tokens; give a longer file")
    prefix = tuple(_special_prefix(tokenizer))
    step = max(window - len(prefix), 2)
    windows = tuple(prefix + tuple(ids[start:start + step]) for start in range(0, len(ids), step))
    return NeutralText(name, tuple(w for w in windows if len(w) >= 2))


def _special_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokens the tokenizer puts before every text (BOS, where it adds one)."""
    marker = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x", add_special_tokens=True)["input_ids"]
    return list(full[:len(full) - len(marker)]) if full[len(full) - len(marker):] == marker else []


def check_neutral(file: str | Path | None, data_dir: str | Path | None) -> None:
    """Fail before any model loads if the neutral corpus cannot be read."""
    if file is None:
        _boolq_file(data_dir)
        return
    path = Path(file).expanduser()
    if not path.is_file():
        raise AufoldError(f"the neutral text {path} is not a file; give a UTF-8 text file with "
                          f"--neutral FILE")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise AufoldError(f"cannot read the neutral text {path}: {first_line(error)}; give a "
                          f"UTF-8 text file with --neutral FILE") from None
    if not text.strip():
        raise AufoldError(f"the neutral text {path} is empty; give a file with prose in it")


def _boolq_file(data_dir: str | Path | None) -> Path:
    """BoolQ's file in the task data folder, else in ``../shared/data``."""
    from aufold.tasks.files import default_data_dir
    from aufold.tasks.registry import get_task

    split = get_task("boolq").splits["test"]  # type: ignore[attr-defined]
    folders = [Path(data_dir).expanduser()] if data_dir is not None else []
    folders += [folder for folder in (default_data_dir(),) if folder is not None]
    path = next((folder / split.file for folder in folders if (folder / split.file).is_file()), None)
    if path is None:
        raise AufoldError(f"the neutral corpus ({DEFAULT_CORPUS}) needs {split.file} in the data "
                          f"folder or in ../shared/data; give a text file with --neutral FILE, "
                          f"or skip the cost with --no-cost")
    return path


def _boolq_passages(data_dir: str | Path | None) -> list[str]:
    """The BoolQ test split's passages, from the task data folder if it holds BoolQ, else from
    ``../shared/data`` (a custom task's folder usually does not)."""
    from aufold.tasks.registry import get_task

    split = get_task("boolq").splits["test"]  # type: ignore[attr-defined]
    path = _boolq_file(data_dir)
    seen: dict[str, None] = {}
    for _, record in split.select(split.read(path)):
        seen.setdefault(str(record["passage"]), None)  # passages repeat across questions
    return list(seen)


@torch.inference_mode()
def edit_costs(model: PreTrainedModel, neutral: NeutralText, edits: Mapping[Key, Edit | VectorEdit],
               *, batch_size: int = 4, progress: bool = True) -> dict[Key, EditCost]:
    """Each edit's KL and perplexity ratio against the unsteered model on ``neutral``; a
    layer-streamed model runs one layer at a time (:mod:`aufold.layerwise.cost`)."""
    from aufold.modeling import input_device, is_layerwise

    if is_layerwise(model):
        from aufold.layerwise.cost import edit_costs_layerwise

        return edit_costs_layerwise(model, neutral, edits, batch_size=batch_size,  # type: ignore[arg-type]
                                    progress=progress)
    device = input_device(model)
    tally = CostTally(edits)
    batches = window_batches(neutral, batch_size)
    with progress_bar(total=len(batches) * (1 + len(edits)), desc="cost", unit="pass",
                      enabled=progress) as bar:
        for batch in batches:
            ids, mask = pad_windows(batch, device)
            hidden = {None: _final_hidden(model, ids, mask)}
            bar.update()
            for key, edit in edits.items():
                with steer(model, edit):
                    hidden[key] = _final_hidden(model, ids, mask)
                bar.update()
            tally.add(ids, mask, lambda key, start, stop: _log_probs(model, hidden[key][:, start:stop]))
    return tally.costs(neutral)


def window_batches(neutral: NeutralText, batch_size: int) -> list[list[tuple[int, ...]]]:
    """The corpus windows in batches of similar length (less padding)."""
    windows = sorted(neutral.windows, key=len)
    return [windows[i:i + batch_size] for i in range(0, len(windows), batch_size)]


class CostTally:
    """The sums behind each edit's KL and perplexity ratio, added a batch at a time."""

    def __init__(self, edits: Mapping[Key, object]) -> None:
        self.keys = list(edits)
        self.kl = {key: 0.0 for key in self.keys}
        self.nll = {key: 0.0 for key in self.keys}
        self.base_nll, self.count = 0.0, 0

    def add(self, ids: torch.Tensor, mask: torch.Tensor,
            log_probs: Callable[[Any, int, int], torch.Tensor]) -> None:
        """One right-padded batch; ``log_probs(key, start, stop)`` gives the float32 next-token
        log-probabilities at positions ``start:stop`` (key None: the unsteered model), a few
        positions at a time so that memory stays flat whatever the vocabulary."""
        valid = mask[:, 1:].bool()
        self.count += int(valid.sum())
        for start in range(0, ids.shape[1] - 1, HEAD_CHUNK):
            stop = min(start + HEAD_CHUNK, ids.shape[1] - 1)
            base = log_probs(None, start, stop)
            # The LM head may sit on another device than the inputs (--device-map).
            keep = valid[:, start:stop].to(base.device)
            target = ids[:, start + 1:stop + 1, None].to(base.device)
            self.base_nll -= float(base.gather(-1, target).squeeze(-1)[keep].sum())
            for key in self.keys:
                steered = log_probs(key, start, stop)
                self.kl[key] += float((base.exp() * (base - steered)).sum(-1)[keep].sum())
                self.nll[key] -= float(steered.gather(-1, target).squeeze(-1)[keep].sum())

    def costs(self, neutral: NeutralText) -> dict[Any, EditCost]:
        # KL is never negative; a sum of float32 terms can round a zero to -1e-9.
        return {key: EditCost(kl=max(self.kl[key] / self.count, 0.0),
                              perplexity_ratio=math.exp((self.nll[key] - self.base_nll) / self.count),
                              corpus=neutral.name, tokens=self.count)
                for key in self.keys}


def pad_windows(windows: list[tuple[int, ...]], device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of windows as right-padded ids and their mask."""
    width = max(len(window) for window in windows)
    ids = torch.zeros(len(windows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, window in enumerate(windows):
        ids[row, :len(window)] = torch.tensor(window)
        mask[row, :len(window)] = 1
    return ids.to(device), mask.to(device)


def _final_hidden(model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The decoder's last hidden states (after its final norm), the LM head's input."""
    output = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False)
    return output.last_hidden_state


def _log_probs(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """Float32 next-token log-probabilities from final hidden states, with the model's own
    final soft-capping of the logits where its config has one (Gemma 2)."""
    logits = model.get_output_embeddings()(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return torch.log_softmax(logits, dim=-1)
