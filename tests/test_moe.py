"""Mixture-of-Experts architectures (Mixtral, Qwen2-MoE, Qwen3-MoE): head, mlp and mlp-out.

Their experts' down projections are one fused 3D parameter in memory and
per-expert 2D tensors on disk. The ``head`` site (columns of ``o_proj``) localizes,
steers and folds in memory and from a streamed checkpoint, whichever way the experts
are stored, and never touches them. The ``mlp-out`` site is the output of the whole
block, the router-weighted sum of experts plus any shared expert: its unit i folds
into row i of every expert's and the shared expert's down projection. The ``mlp``
site is the neurons of the routed experts: unit e * n + j is neuron j of expert e,
read and steered only where the router picks that expert, and folded into column j of
expert e's down projection.
"""

from __future__ import annotations

import copy
import filecmp
import json
from pathlib import Path

import pytest
import torch
from edit_helpers import (
    assert_one_line_error,
    bits,
    logits,
    random_plan,
    relative_diff,
    run_cli,
    tensors,
)
from safetensors.torch import save_file
from tiny_models import MOE_ARCHITECTURES, save_tiny_model, tiny_model, tiny_tokenizer
from transformers import PreTrainedModel

from aufold.checkpoint import INDEX_FILE, open_checkpoint
from aufold.edit import Edit, SteeredUnit
from aufold.errors import AufoldError
from aufold.export import export
from aufold.fold import fold_model
from aufold.localize import localize
from aufold.modeling import fingerprint, load_model
from aufold.pairs import ContrastivePair, write_pairs
from aufold.sites import architecture_for
from aufold.steer import steer
from aufold.streaming import checkpoint_architecture, checkpoint_fingerprint

K = 40
ALPHA = 2.0
PAIRS = [ContrastivePair(f"{a} plus 2 is", f" {a + 2}", f" {a + 3}") for a in range(6)]


def head_edit(model: PreTrainedModel, seed: int = 0) -> Edit:
    return random_plan(model, seed=seed, sites=("head",)).select(K, ALPHA)


def o_proj(layer: int) -> str:
    return f"model.layers.{layer}.self_attn.o_proj.weight"


def folded_reference(original: dict[str, torch.Tensor], edit: Edit) -> dict[str, torch.Tensor]:
    """o_proj columns times (1 + gamma) in float32, rounded once; every other tensor as it was."""
    expected = dict(original)
    for layer in {unit.layer for unit in edit.units}:
        weight = original[o_proj(layer)].float().clone()
        for unit in edit.units:
            if unit.layer == layer:
                weight[:, unit.unit] *= torch.tensor(1.0 + unit.gamma, dtype=torch.float32)
        expected[o_proj(layer)] = weight.to(original[o_proj(layer)].dtype)
    return expected


def assert_bitwise(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and torch.equal(bits(got[name]), bits(tensor)), name


@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
def test_fold_matches_hooks_and_leaves_the_experts_alone(arch: str) -> None:
    model = tiny_model(arch)
    edit = head_edit(model)
    plain = logits(model)
    with steer(model, edit):
        hooked = logits(model)
    assert relative_diff(hooked, plain) > 1e-2  # the edit does something
    folded = copy.deepcopy(model)
    fold_model(folded, edit)
    assert relative_diff(logits(folded), hooked) <= 1e-5

    original = {name: p.detach() for name, p in model.named_parameters()}
    assert any(p.dim() == 3 for p in original.values())  # fused experts in memory
    got = {name: p.detach() for name, p in folded.named_parameters()}
    assert_bitwise(got, folded_reference(original, edit))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
def test_streamed_export_of_per_expert_shards(arch: str, dtype: torch.dtype, tmp_path: Path) -> None:
    model = tiny_model(arch, dtype=dtype)
    source = tmp_path / "source"
    model.save_pretrained(source, max_shard_size="60KB")
    tiny_tokenizer().save_pretrained(source)
    original = tensors(source)
    experts = {name: t for name, t in original.items() if ".experts." in name}
    # transformers writes each expert's projections as its own 2D tensor.
    assert experts and all(t.dim() == 2 for t in experts.values())
    checkpoint = open_checkpoint(source)
    assert len(checkpoint.shards) >= 2
    config, architecture = checkpoint_architecture(source)
    assert checkpoint_fingerprint(checkpoint, config, architecture) == fingerprint(model)

    plan = random_plan(model, sites=("head",))
    result = export(source, plan, k=K, alpha=ALPHA, out=tmp_path / "streamed")
    assert result.streamed is not None and result.streamed.copied
    got = tensors(result.out)
    assert_bitwise(got, folded_reference(original, result.edit))
    assert_bitwise({name: got[name] for name in experts}, experts)
    for file in result.streamed.copied:  # shards without an o_proj: byte copies
        assert filecmp.cmp(source / file, result.out / file, shallow=False)

    if dtype == torch.float32:  # transformers loads the streamed folder as the hooked model
        reloaded, _, _ = load_model(result.out)
        with steer(model, result.edit):
            hooked = logits(model)
        assert relative_diff(logits(reloaded), hooked) <= 1e-5


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_streamed_export_of_fused_expert_shards(arch: str, tmp_path: Path) -> None:
    """Experts stored as the 3D tensors the model holds in memory, written by hand in two shards."""
    model = tiny_model(arch)
    source = tmp_path / "source"
    source.mkdir()
    state = {name: p.detach().contiguous() for name, p in model.named_parameters()}
    assert any(t.dim() == 3 for t in state.values())
    names = sorted(state)
    weight_map = {}
    for number, part in enumerate((names[::2], names[1::2])):
        file = f"model-0000{number + 1}-of-00002.safetensors"
        save_file({name: state[name] for name in part}, source / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    (source / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    model.config.save_pretrained(source)
    tiny_tokenizer().save_pretrained(source)

    plan = random_plan(model, sites=("head",))
    result = export(source, plan, k=K, alpha=ALPHA, out=tmp_path / "streamed")
    assert result.streamed is not None
    assert_bitwise(tensors(result.out), folded_reference(state, result.edit))


@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
def test_localize_head(arch: str) -> None:
    model, tokenizer = tiny_model(arch), tiny_tokenizer()
    plan = localize(model, tokenizer, PAIRS, ["head", "residual"], progress=False)
    assert plan.sites == ("head", "residual") and plan.fingerprint == fingerprint(model)
    assert plan.counts["head"].positive.shape == (model.config.num_hidden_layers, 64)
    assert int(plan.counts["head"].positive.sum() + plan.counts["head"].negative.sum()) > 0


def test_vectors_that_need_the_mlp_bias_are_refused() -> None:
    architecture = architecture_for("mixtral")
    assert architecture.sites == ("head", "mlp", "mlp-out", "residual")
    assert architecture.vector_module("residual", 2) == "model.layers.2"  # hook mode still works
    refused = r"needs the MLP down projection, but not every layer of mixtral has one"
    for target in ("residual", "mlp-out"):
        with pytest.raises(AufoldError, match=refused):
            architecture.vector_bias(target, 0)
    with pytest.raises(AufoldError, match=refused):
        architecture.vector_module("mlp-out", 0)
    # Qwen3-MoE's attention_bias flag gives o_proj a bias for an attention-out vector.
    bias = architecture_for("qwen3_moe").vector_bias("attention-out", 0)
    assert (bias.module, bias.config_flag) == ("model.layers.0.self_attn.o_proj", "attention_bias")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("moe-cli")
    save_tiny_model("mixtral", root / "mixtral")
    write_pairs(PAIRS, root / "pairs.jsonl")
    return root


def test_cli_localizes_and_exports_the_expert_neurons(workspace: Path) -> None:
    plan = workspace / "plan-mlp"
    result = run_cli("localize", workspace / "mixtral", "--pairs", workspace / "pairs.jsonl",
                     "--site", "mlp", "--out", plan)
    assert result.exit_code == 0, result.output
    result = run_cli("export", workspace / "mixtral", "--plan", plan, "--k", 8, "--alpha", 2,
                     "--out", workspace / "steered-mlp")
    assert result.exit_code == 0, result.output
    assert "folded 8 units (mlp)" in result.output
    result = run_cli("export", workspace / "mixtral", "--plan", plan, "--k", 8, "--alpha", 2,
                     "--format", "lora", "--out", workspace / "adapter-mlp")
    assert_one_line_error(result, "LoRA", "'mlp'", "Mixture-of-Experts", "--format checkpoint")
    assert not (workspace / "adapter-mlp").exists()


def test_cli_localizes_and_exports_the_head_site(workspace: Path) -> None:
    plan = workspace / "plan-head"
    result = run_cli("localize", workspace / "mixtral", "--pairs", workspace / "pairs.jsonl",
                     "--site", "head", "--out", plan)
    assert result.exit_code == 0, result.output
    result = run_cli("export", workspace / "mixtral", "--plan", plan, "--k", 8, "--alpha", 2,
                     "--out", workspace / "steered")
    assert result.exit_code == 0, result.output
    assert "streamed" in result.output and "folded 8 units (head)" in result.output


# --- mlp-out: the output of the whole experts block ----------------------------------

def mlp_out_edit(model: PreTrainedModel, seed: int = 0) -> Edit:
    return random_plan(model, seed=seed, sites=("mlp-out",)).select(K, ALPHA)


def block_reference(original: dict[str, torch.Tensor], edit: Edit) -> dict[str, torch.Tensor]:
    """Written from the math alone: the block's output unit i is row i of every expert's down
    projection ([E, out, in] in memory) and of the shared expert's, each times (1 + gamma)."""
    expected = dict(original)
    for unit in edit.units:
        prefix = f"model.layers.{unit.layer}.mlp."
        factor = torch.tensor(1.0 + unit.gamma, dtype=torch.float32)
        for name in (f"{prefix}experts.down_proj", f"{prefix}shared_expert.down_proj.weight"):
            if name in expected:
                weight = expected[name].float().clone()
                rows = weight[:, unit.unit] if weight.dim() == 3 else weight[unit.unit]
                rows *= factor
                expected[name] = weight.to(original[name].dtype)
    return expected


@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
def test_mlp_out_fold_matches_hooks_and_a_plain_reference(arch: str) -> None:
    model = tiny_model(arch)
    edit = mlp_out_edit(model)
    plain = logits(model)
    with steer(model, edit):
        hooked = logits(model)
    assert relative_diff(hooked, plain) > 1e-2
    folded = copy.deepcopy(model)
    fold_model(folded, edit)
    assert relative_diff(logits(folded), hooked) <= 1e-5
    original = {name: p.detach() for name, p in model.named_parameters()}
    got = {name: p.detach() for name, p in folded.named_parameters()}
    # The reference folds one unit at a time; units are distinct, so each row is scaled once.
    assert_bitwise(got, block_reference(original, edit))
    if arch == "qwen2_moe":  # the shared expert is scaled too (its plan does not name it)
        name = "model.layers.0.mlp.shared_expert.down_proj.weight"
        assert not torch.equal(got[name], original[name]) or not any(
            unit.layer == 0 for unit in edit.units)


@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
def test_mlp_out_localizes_at_the_block_output(arch: str) -> None:
    model, tokenizer = tiny_model(arch), tiny_tokenizer()
    plan = localize(model, tokenizer, PAIRS, ["mlp-out"], progress=False)
    assert plan.counts["mlp-out"].positive.shape == (model.config.num_hidden_layers, 64)
    # The block's output at the last token, read by a plain hook on the block module.
    reads: dict[int, list[torch.Tensor]] = {}
    handles = [layer.mlp.register_forward_hook(
        lambda _m, _a, out, n=n: reads.setdefault(n, []).append(
            (out[0] if isinstance(out, tuple) else out)[0, -1].clone()))
        for n, layer in enumerate(model.model.layers)]
    try:
        with torch.no_grad():
            for pair in PAIRS:
                for answer in (pair.positive, pair.negative):
                    ids = tokenizer(pair.prompt + answer, return_tensors="pt").input_ids
                    model(input_ids=ids)
    finally:
        for handle in handles:
            handle.remove()
    for layer, values in reads.items():
        stacked = torch.stack(values).unflatten(0, (-1, 2))
        difference = stacked[:, 0] - stacked[:, 1]
        positive = (difference > 1e-6 * stacked.abs().amax()).sum(0)
        assert torch.equal(plan.counts["mlp-out"].positive[layer], positive) or \
            (plan.counts["mlp-out"].positive[layer] - positive).abs().max() <= 1


# Where save_pretrained stores expert e's down projection, [out, in], by transformers'
# conversion mapping (Mixtral keeps its original checkpoint names).
STORED_EXPERT = {"mixtral": "model.layers.{layer}.block_sparse_moe.experts.{expert}.w2.weight",
                 "qwen2_moe": "model.layers.{layer}.mlp.experts.{expert}.down_proj.weight"}


def stored_expert_reference(arch: str, original: dict[str, torch.Tensor], edit: Edit,
                            experts: int, per_expert: int) -> dict[str, torch.Tensor]:
    """Written from the math on the stored per-expert tensors: an mlp unit scales one column
    of its own expert; an mlp-out unit scales one row of every expert and of the shared one."""
    expected = dict(original)

    def scale(name: str, row: int | None, column: int | None, gamma: float) -> None:
        weight = expected[name].float().clone()
        weight[row if row is not None else slice(None),
               column if column is not None else slice(None)] *= torch.tensor(
            1.0 + gamma, dtype=torch.float32)
        expected[name] = weight.to(original[name].dtype)

    for unit in edit.units:
        name = STORED_EXPERT[arch].format(layer=unit.layer, expert="{expert}")
        if unit.site == "mlp":
            scale(name.format(expert=unit.unit // per_expert), None, unit.unit % per_expert,
                  unit.gamma)
            continue
        for expert in range(experts):
            scale(name.format(expert=expert), unit.unit, None, unit.gamma)
        shared = f"model.layers.{unit.layer}.mlp.shared_expert.down_proj.weight"
        if shared in expected:
            scale(shared, unit.unit, None, unit.gamma)
    return expected


@pytest.mark.parametrize("site", ["mlp", "mlp-out"])
@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_experts_export_of_per_expert_shards_streams(arch: str, site: str,
                                                     tmp_path: Path) -> None:
    """save_pretrained stores each expert apart; transformers' conversion mapping says the
    in-memory [E, ...] tensor is their stack, so the fold edits the stored experts one by
    one and streams, bitwise as the math says, and reloads as the hooked model."""
    model = tiny_model(arch)
    source = save_tiny_model(arch, tmp_path / "source")
    original = tensors(source)
    plan = random_plan(model, sites=(site,))
    result = export(source, plan, k=K, alpha=ALPHA, out=tmp_path / "out", cost=False)
    assert result.streamed is not None
    experts = experts_of(model, 0)
    assert_bitwise(tensors(result.out), stored_expert_reference(
        arch, original, result.edit, experts.num_experts, experts.down_proj.shape[2]))
    reloaded, _, _ = load_model(result.out)
    with steer(model, result.edit):
        hooked = logits(model)
    assert relative_diff(logits(reloaded), hooked) <= 1e-5


@pytest.mark.parametrize("site", ["mlp", "mlp-out"])
def test_experts_export_of_fused_shards_streams_bitwise(site: str, tmp_path: Path) -> None:
    model = tiny_model("qwen2_moe")
    source = tmp_path / "source"
    source.mkdir()
    state = {name: p.detach().contiguous() for name, p in model.named_parameters()}
    save_file(state, source / "model.safetensors", metadata={"format": "pt"})
    model.config.save_pretrained(source)
    tiny_tokenizer().save_pretrained(source)
    plan = random_plan(model, sites=(site,))
    result = export(source, plan, k=K, alpha=ALPHA, out=tmp_path / "streamed", cost=False)
    assert result.streamed is not None
    per_expert = experts_of(model, 0).down_proj.shape[2]
    want = block_reference(state, result.edit) if site == "mlp-out" else \
        neuron_reference(state, result.edit, per_expert)
    assert_bitwise(tensors(result.out), want)


@pytest.mark.parametrize("export_format", ["lora", "ia3"])
def test_adapters_refuse_the_block_output(export_format: str, tmp_path: Path) -> None:
    source = save_tiny_model("mixtral", tmp_path / "source")
    plan = random_plan(tiny_model("mixtral"), sites=("mlp-out",))
    with pytest.raises(AufoldError, match=r"Mixture-of-Experts block.*--format checkpoint"):
        export(source, plan, k=K, alpha=ALPHA, out=tmp_path / "out", format=export_format,
               cost=False)
    assert not (tmp_path / "out").exists()


# --- mlp: the neurons of each expert ---------------------------------------------------

IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")


def experts_of(model: PreTrainedModel, layer: int) -> torch.nn.Module:
    return model.model.layers[layer].mlp.experts


def neuron_reference(original: dict[str, torch.Tensor], edit: Edit, per_expert: int
                     ) -> dict[str, torch.Tensor]:
    """Written from the math alone: unit u is neuron u % n of expert u // n, the input column
    u % n of that expert's slice of the stacked [E, out, n] down projection."""
    expected = dict(original)
    for unit in edit.units:
        name = f"model.layers.{unit.layer}.mlp.experts.down_proj"
        weight = expected[name].float().clone()
        weight[unit.unit // per_expert, :, unit.unit % per_expert] *= torch.tensor(
            1.0 + unit.gamma, dtype=torch.float32)
        expected[name] = weight.to(original[name].dtype)
    return expected


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
def test_mlp_fold_matches_hooks_under_every_experts_implementation(
        arch: str, implementation: str) -> None:
    """The hooks run the experts' own loop, so they steer alike whichever implementation the
    model uses; the folded model runs that implementation on the scaled weights."""
    model = tiny_model(arch)
    model.set_experts_implementation(implementation)
    experts = experts_of(model, 0)
    per_expert = experts.down_proj.shape[2]
    assert model.config._experts_implementation == implementation
    edit = random_plan(model, sites=("mlp",)).select(K, ALPHA)
    assert {unit.unit // per_expert for unit in edit.units} == set(range(experts.num_experts))
    plain = logits(model)
    with steer(model, edit):
        hooked = logits(model)
    assert "forward" not in experts.__dict__  # the experts' own forward is back
    assert relative_diff(hooked, plain) > 1e-2
    assert relative_diff(logits(model), plain) == 0
    folded = copy.deepcopy(model)
    fold_model(folded, edit)
    assert relative_diff(logits(folded), hooked) <= 1e-5
    original = {name: p.detach() for name, p in model.named_parameters()}
    got = {name: p.detach() for name, p in folded.named_parameters()}
    assert_bitwise(got, neuron_reference(original, edit, per_expert))


def test_mlp_and_mlp_out_in_one_tensor_multiply() -> None:
    """A unit of each site in one experts tensor: the element in both slices gets the product."""
    model = tiny_model("mixtral")
    per_expert = experts_of(model, 1).down_proj.shape[2]
    edit = Edit.of([SteeredUnit("mlp", 1, 2 * per_expert + 5, 0.5),
                    SteeredUnit("mlp-out", 1, 7, -0.25)])
    folded = copy.deepcopy(model)
    fold_model(folded, edit)
    before = experts_of(model, 1).down_proj.detach()
    after = experts_of(folded, 1).down_proj.detach()
    changed = (after != before).nonzero().tolist()
    assert {(e, i, j) for e, i, j in changed} <= {(2, i, 5) for i in range(64)} | {
        (e, 7, j) for e in range(4) for j in range(per_expert)}
    assert torch.equal(after[2, 7, 5], (before[2, 7, 5] * torch.tensor(1.5) * torch.tensor(0.75)))
    with steer(model, edit):
        hooked = logits(model)
    assert relative_diff(logits(folded), hooked) <= 1e-5


def plain_neurons(model: PreTrainedModel, tokenizer: object, text: str) -> list[torch.Tensor]:
    """Each layer's expert neurons at the last token, computed from the weights: the block's
    input, the router's top k, act(gate) * up for each picked expert; NaN for the others."""
    inputs: dict[int, torch.Tensor] = {}
    handles = [layer.mlp.register_forward_pre_hook(
        lambda _m, args, n=n: inputs.__setitem__(n, args[0][0, -1].clone()))
        for n, layer in enumerate(model.model.layers)]
    try:
        with torch.no_grad():
            model(input_ids=tokenizer(text, return_tensors="pt").input_ids)  # type: ignore[operator]
    finally:
        for handle in handles:
            handle.remove()
    rows = []
    for number, layer in enumerate(model.model.layers):
        x, block = inputs[number], layer.mlp
        picked = torch.topk(x @ block.gate.weight.T, model.config.num_experts_per_tok).indices
        experts = block.experts
        per_expert = experts.down_proj.shape[2]
        row = torch.full((experts.num_experts * per_expert,), float("nan"))
        for expert in picked.tolist():
            gate, up = (experts.gate_up_proj[expert] @ x).chunk(2)
            row[expert * per_expert:(expert + 1) * per_expert] = experts.act_fn(gate) * up
        rows.append(row)
    return rows


@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
def test_mlp_localizes_each_experts_neurons_with_unpicked_experts_tied(arch: str) -> None:
    model, tokenizer = tiny_model(arch), tiny_tokenizer()
    plan = localize(model, tokenizer, PAIRS, ["mlp"], progress=False, tie_tolerance=0)
    experts = experts_of(model, 0)
    width = experts.num_experts * experts.down_proj.shape[2]
    counts = plan.counts["mlp"]
    assert counts.positive.shape == (model.config.num_hidden_layers, width)
    positive, negative = torch.zeros_like(counts.positive), torch.zeros_like(counts.negative)
    for pair in PAIRS:
        good = plain_neurons(model, tokenizer, pair.prompt + pair.positive)
        bad = plain_neurons(model, tokenizer, pair.prompt + pair.negative)
        for layer, (x_pos, x_neg) in enumerate(zip(good, bad)):
            m = x_pos - x_neg  # NaN where either text did not pick the expert: a tie
            positive[layer] += m > 0
            negative[layer] += m < 0
    assert torch.equal(counts.positive, positive) and torch.equal(counts.negative, negative)
    # Two of four experts per token: most pairs tie on most units, and no unit is counted
    # in a pair where its expert was picked for one text only.
    decided = counts.positive + counts.negative
    assert int(decided.max()) <= len(PAIRS) and int((decided < len(PAIRS)).sum()) > width


def test_a_checkpoint_missing_an_expert_is_refused_before_anything_is_written(
        tmp_path: Path) -> None:
    model = tiny_model("qwen2_moe")
    source = save_tiny_model("qwen2_moe", tmp_path / "source")
    stored = tensors(source)
    kept = {name: t for name, t in stored.items() if ".mlp.experts.3." not in name}
    (file,) = source.glob("*.safetensors")
    save_file(kept, file, metadata={"format": "pt"})
    plan = random_plan(model, sites=("mlp-out",))
    with pytest.raises(AufoldError, match=r"stores 3 experts .* but the model has 4"):
        export(source, plan, k=K, alpha=ALPHA, out=tmp_path / "out", cost=False)
    assert not (tmp_path / "out").exists()


def test_expert_hooks_refuse_an_offloaded_experts_module() -> None:
    model = tiny_model("mixtral")
    experts = experts_of(model, 0)
    experts._hf_hook = object()  # what accelerate's device_map offload leaves on a module
    edit = Edit.of([SteeredUnit("mlp", 0, 3, 1.0)])
    with pytest.raises(AufoldError, match="device_map"), steer(model, edit):
        pass
