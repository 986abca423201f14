"""The streaming fold against the in-memory fold, and its refusals of bad input.

Every architecture, float32 and bfloat16, one file and several shards: the
streamed checkpoint holds bitwise the tensors that the in-memory export writes,
its shards without edits are byte copies (or hard links) of the input, and the
fingerprint read from the files equals the loaded model's.
"""

from __future__ import annotations

import errno
import filecmp
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from edit_helpers import bits, tensors
from safetensors.torch import load_file, save_file
from tiny_models import ARCHITECTURES, tiny_model, tiny_tokenizer
from transformers import PreTrainedModel

import cli
from aufold import checkpoint as checkpoint_module
from aufold.checkpoint import INDEX_FILE, SINGLE_FILE, open_checkpoint, read_header, safetensors_writer
from aufold.errors import AufoldError
from aufold.export import export, export_loaded
from aufold.modeling import fingerprint, load_model, site_width
from aufold.plan import Plan, SiteCounts
from aufold.streaming import checkpoint_architecture, checkpoint_fingerprint

REPO = Path(__file__).resolve().parents[1]
SITES = ("head", "mlp", "mlp-out")
K = 80


def random_plan(model: PreTrainedModel, seed: int = 0, sites: tuple[str, ...] = SITES) -> Plan:
    generator = torch.Generator().manual_seed(seed)
    layers = model.config.num_hidden_layers
    counts = {}
    for site in sites:
        shape = (layers, site_width(model, site))
        positive = torch.randint(0, 50, shape, generator=generator)
        # At most 50 pairs in all: every unit's r_pos + r_neg <= 1, as Plan.load checks.
        negative = torch.randint(0, 50, shape, generator=generator) % (51 - positive)
        counts[site] = SiteCounts(positive, negative)
    return Plan("tiny", fingerprint(model), 50, counts)


def save(model: PreTrainedModel, folder: Path, shard: str | None) -> Path:
    if shard:
        model.save_pretrained(folder, max_shard_size=shard)
    else:
        model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("shard", [None, "60KB"], ids=["single", "sharded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_streamed_equals_in_memory_fold(arch: str, dtype: torch.dtype, shard: str | None,
                                        tmp_path: Path) -> None:
    model = tiny_model(arch, dtype=dtype)
    source = save(model, tmp_path / "source", shard)
    assert (source / (INDEX_FILE if shard else SINGLE_FILE)).is_file()
    before = digest(source)
    plan = random_plan(model)

    checkpoint = open_checkpoint(source)
    config, architecture = checkpoint_architecture(source)
    assert checkpoint_fingerprint(checkpoint, config, architecture) == fingerprint(model)

    streamed = export(source, plan, k=K, alpha=2.5, out=tmp_path / "streamed")
    assert streamed.streamed is not None
    loaded, tokenizer, _ = load_model(source)
    in_memory = export_loaded(loaded, tokenizer, plan, k=K, alpha=2.5, out=tmp_path / "memory",
                              sites=plan.sites, base_model="tiny")
    assert streamed.edit == in_memory.edit

    got, want, original = tensors(streamed.out), tensors(in_memory.out), tensors(source)
    assert set(got) == set(original)
    assert set(want) <= set(got)
    for name, tensor in want.items():
        assert torch.equal(bits(got[name]), bits(tensor)), name
    changed = {name for name in got if not torch.equal(bits(got[name]), bits(original[name]))}
    assert changed and all(".o_proj." in n or "down_proj" in n or "c_proj" in n for n in changed)
    # Unedited shards are byte copies; the rest of the folder is the input's.
    for file in set(streamed.streamed.copied):
        assert filecmp.cmp(source / file, streamed.out / file, shallow=False)
    for file in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (streamed.out / file).read_bytes() == (source / file).read_bytes()
    assert json.loads((streamed.out / "aufold.json").read_text())["selection"]["k"] == K
    assert "folded" in (streamed.out / "README.md").read_text().lower()
    assert digest(source) == before
    # The streamed folder loads as the same model with the folded weights.
    reloaded, _, _ = load_model(streamed.out)
    folded_params = dict(loaded.named_parameters())
    for name, parameter in reloaded.named_parameters():
        assert torch.equal(bits(parameter.data), bits(folded_params[name].data)), name


def test_link_unchanged_links_only_shards_without_edits(tmp_path: Path) -> None:
    model = tiny_model("llama")
    source = save(model, tmp_path / "source", "40KB")
    # Only the last layer: the first shards hold no edit.
    layers = model.config.num_hidden_layers
    plan = random_plan(model)
    for counts in plan.counts.values():
        counts.positive[: layers - 1] = 0
        counts.negative[: layers - 1] = 0
    result = export(source, plan, k=20, alpha=1.0, out=tmp_path / "out", link_unchanged=True)
    report = result.streamed
    assert report is not None and report.linked and report.folded and not report.copied
    for file in report.linked:
        assert os.stat(source / file).st_ino == os.stat(result.out / file).st_ino
    for file in report.folded:
        assert os.stat(source / file).st_ino != os.stat(result.out / file).st_ino
    plain = export(source, plan, k=20, alpha=1.0, out=tmp_path / "plain")
    assert plain.streamed is not None and set(plain.streamed.copied) == set(report.linked)
    for file in report.folded + report.linked:
        assert filecmp.cmp(plain.out / file, result.out / file, shallow=False)


def test_cli_export_streams_and_reports(tmp_path: Path) -> None:
    model = tiny_model("qwen2")
    source = save(model, tmp_path / "source", "60KB")
    random_plan(model).save(tmp_path / "plan")
    result = CliRunner().invoke(cli.main, [
        "export", str(source), "--plan", str(tmp_path / "plan"), "--k", "10", "--alpha", "2",
        "--out", str(tmp_path / "out"), "--link-unchanged"])
    assert result.exit_code == 0, result.output
    assert "streamed" in result.output and "hard-linked" in result.output


@pytest.mark.parametrize("shard", [None, "60KB"], ids=["single", "sharded"])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3_text"])
def test_dtype_conversion_streams_and_equals_the_in_memory_fold(arch: str, shard: str | None,
                                                                tmp_path: Path) -> None:
    # Converted per tensor, then folded: bitwise what transformers' load in bfloat16 and the
    # in-memory fold give, with config and index saying bfloat16; nothing else changes.
    model = tiny_model(arch)
    source = save(model, tmp_path / "source", shard)
    before = digest(source)
    plan = random_plan(model)
    same = export(source, plan, k=5, alpha=1.0, out=tmp_path / "same", dtype="float32")
    assert same.streamed is not None and not same.streamed.converted
    converted = export(source, plan, k=5, alpha=1.0, out=tmp_path / "converted", dtype="bfloat16")
    report = converted.streamed
    assert report is not None and report.dtype == "bfloat16"
    assert "converted to bfloat16" in report.summary()
    got = tensors(converted.out)
    assert {t.dtype for t in got.values()} == {torch.bfloat16}
    loaded, tokenizer, _ = load_model(source, dtype="bfloat16")
    in_memory = export_loaded(loaded, tokenizer, plan, k=5, alpha=1.0, out=tmp_path / "memory",
                              sites=plan.sites, base_model="tiny")
    for name, tensor in tensors(in_memory.out).items():
        assert torch.equal(bits(got[name]), bits(tensor)), name
    config = json.loads((converted.out / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    if shard:
        index = json.loads((converted.out / INDEX_FILE).read_text())
        sizes = sum(t.numel() * 2 for t in got.values())
        assert index["metadata"]["total_size"] == sizes
        assert index["weight_map"] == json.loads((source / INDEX_FILE).read_text())["weight_map"]
    assert json.loads((converted.out / "aufold.json").read_text())["dtype"] == "bfloat16"
    reloaded, _, _ = load_model(converted.out)
    assert reloaded.dtype == torch.bfloat16
    for name, parameter in reloaded.named_parameters():
        assert torch.equal(bits(parameter.data), bits(dict(loaded.named_parameters())[name].data)), name
    assert digest(source) == before


def test_gpt2_names_without_the_base_model_prefix(tmp_path: Path) -> None:
    """GPT-2's original checkpoints store ``h.0...``, not ``transformer.h.0...``."""
    model = tiny_model("gpt2")
    source = save(model, tmp_path / "source", None)
    state = load_file(source / SINGLE_FILE)
    save_file({name.removeprefix("transformer."): t for name, t in state.items()},
              source / SINGLE_FILE, metadata={"format": "pt"})
    plan = random_plan(model)
    checkpoint = open_checkpoint(source)
    config, architecture = checkpoint_architecture(source)
    assert checkpoint_fingerprint(checkpoint, config, architecture) == fingerprint(model)
    streamed = export(source, plan, k=K, alpha=2.0, out=tmp_path / "streamed")
    loaded, tokenizer, _ = load_model(source)
    memory = export_loaded(loaded, tokenizer, plan, k=K, alpha=2.0, out=tmp_path / "memory",
                           sites=plan.sites, base_model="tiny")
    got, want = tensors(streamed.out), tensors(memory.out)
    for name, tensor in want.items():
        assert torch.equal(bits(got[name.removeprefix("transformer.")]), bits(tensor)), name


def test_hub_cached_checkpoint_streams(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    model = tiny_model("llama")
    commit = "0" * 40
    repo = tmp_path / "hub" / "models--someone--tiny"
    save(model, repo / "snapshots" / commit, "60KB")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    result = export("someone/tiny", random_plan(model), k=10, alpha=1.0, out=tmp_path / "out")
    assert result.streamed is not None
    assert json.loads((result.out / "aufold.json").read_text())["base_model"] == "someone/tiny"


def test_safetensors_writer_round_trips(tmp_path: Path) -> None:
    values = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.zeros(0)}
    entries = [(n, checkpoint_module.DTYPE_NAMES[t.dtype], t.shape, t.numel() * t.element_size())
               for n, t in values.items()]
    path = tmp_path / "x.safetensors"
    with safetensors_writer(path, entries, {"format": "pt"}) as writer:
        for name, tensor in values.items():
            writer.write(name, checkpoint_module.tensor_bytes(tensor))
    loaded = load_file(path)
    assert all(torch.equal(loaded[n], t) for n, t in values.items())
    assert read_header(path).metadata == {"format": "pt"}


# --- bad input ------------------------------------------------------------------------------


def test_pickle_only_checkpoint_is_refused_unless_allowed(tmp_path: Path) -> None:
    model = tiny_model("llama")
    source = tmp_path / "source"
    save(model, source, None)
    torch.save(load_file(source / SINGLE_FILE), source / "pytorch_model.bin")
    (source / SINGLE_FILE).unlink()
    plan = random_plan(model)
    with pytest.raises(AufoldError, match=r"pickle weights only .*convert.*--allow-pickle"):
        export(source, plan, k=5, alpha=1.0, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    plan.save(tmp_path / "plan")
    result = CliRunner().invoke(cli.main, ["export", str(source), "--plan", str(tmp_path / "plan"),
                                           "--k", "5", "--alpha", "1", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "--allow-pickle" in result.output
    allowed = export(source, plan, k=5, alpha=1.0, out=tmp_path / "out", allow_pickle=True)
    assert allowed.streamed is None and (allowed.out / SINGLE_FILE).is_file()


def test_missing_shard_is_named(tmp_path: Path) -> None:
    model = tiny_model("llama")
    source = save(model, tmp_path / "source", "60KB")
    shards = sorted(source.glob("model-*.safetensors"))
    shards[1].unlink()
    with pytest.raises(AufoldError, match=rf"shard {shards[1].name} listed in .* is missing"):
        export(source, random_plan(model), k=5, alpha=1.0, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_damaged_shard_header_is_named(tmp_path: Path) -> None:
    model = tiny_model("llama")
    source = save(model, tmp_path / "source", "60KB")
    shard = sorted(source.glob("model-*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # truncated download
    with pytest.raises(AufoldError, match=rf"{shard.name} is not a valid safetensors file"):
        export(source, random_plan(model), k=5, alpha=1.0, out=tmp_path / "out")


def test_plan_of_another_shape_is_refused(tmp_path: Path) -> None:
    model = tiny_model("llama")
    source = save(model, tmp_path / "source", "60KB")
    other = tiny_model("llama")
    other.config.intermediate_size = 256  # a plan made for a wider MLP
    plan = random_plan(model)
    wide = torch.zeros(3, 256, dtype=torch.long)
    wide[2, 200] = 50
    plan = Plan("other", "sha256:" + "1" * 32, 50, {**plan.counts, "mlp": SiteCounts(wide, wide * 0)})
    with pytest.raises(AufoldError, match="plan was made for another model"):
        export(source, plan, k=1, alpha=1.0, sites=["mlp"], out=tmp_path / "out")
    with pytest.raises(AufoldError, match=r"down_proj.weight has shape \[64, 128\].*unit 200"):
        export(source, plan, k=1, alpha=1.0, sites=["mlp"], out=tmp_path / "out", force=True)
    assert not (tmp_path / "out").exists()


def test_disk_full_removes_the_partial_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model("llama")
    source = save(model, tmp_path / "source", "60KB")
    before = digest(source)
    calls = {"n": 0}
    real = checkpoint_module.write_all

    def fill_up(target: int, data: bytes, offset: int) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(target, data, offset)

    monkeypatch.setattr("aufold.streaming.write_all", fill_up)
    out = tmp_path / "outputs" / "folded"
    with pytest.raises(AufoldError, match="disk filled up .* partial output was removed .*input is "
                                          "untouched"):
        export(source, random_plan(model), k=K, alpha=1.0, out=out)
    assert calls["n"] == 2
    assert not out.exists() and not out.parent.exists()  # the folder made for it is gone too
    assert digest(source) == before


def test_too_little_free_space_is_refused_before_writing(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model("llama")
    source = save(model, tmp_path / "source", "60KB")
    tiny_disk = SimpleNamespace(total=10**6, used=10**6, free=1000)
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: tiny_disk)
    with pytest.raises(AufoldError, match="not enough disk space"):
        export(source, random_plan(model), k=5, alpha=1.0, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_fold_bench_small_size_checks_bitwise(tmp_path: Path) -> None:
    """The benchmark at 20 MB: the same code path, checked against the in-memory fold."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "fold_bench.py"),
                             "--size", "20MB", "--check"], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "bitwise equal to the in-memory fold: yes" in result.stdout
    assert list(tmp_path.iterdir()) == []  # the temporary folder is gone
