"""GGUF export on the files people download: SmolLM2's Q4_1 and Gemma 3's Q4_K_M.

For head, mlp and mlp-out units together, the folded file loaded back by
transformers matches the hook mode on the dequantized base, and the error it adds
is compared with the format's own noise floor: the logit change that rounding
every quantized weight to its block's grid causes (modelled as uniform rounding
error of one grid step, the textbook model of quantization noise). Bytes: untouched
tensors are the input's, row-scaled tensors differ only in block scales, and a
re-encoded ``attn_output`` is the exact fold of the dequantized tensor, quantized
once to Q8_0.
"""

from __future__ import annotations


import gguf
import numpy as np
import pytest
import torch
from edit_helpers import random_plan
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from gguf.quants import Q4_K, Q5_K, dequantize, quantize
from test_gguf import scale_field_bytes, tensor_bytes
from transformers import AutoModelForCausalLM

from aufold.export import export
from aufold.fold import fold_tensor
from aufold.formats.gguf import gguf_tensors, read_gguf_model
from aufold.formats.gguf.blocks import BLOCK_SCALES
from aufold.formats.gguf.fold import gguf_tensor_edits
from aufold.modeling import load_model, smollm2_gguf_path
from aufold.steer import steer

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    if n < 2:",
           "Question: Which is heavier, a kilogram of feathers or a kilogram of iron? Answer:"]
GGUF_ARCH = {"llama": gguf.MODEL_ARCH.LLAMA, "gemma3_text": gguf.MODEL_ARCH.GEMMA3}
# transformers permutes the rows of llama's attn_q and attn_k when it loads a GGUF file,
# so the noise floor leaves them out (it is then a lower bound, which only makes the
# comparison stricter).
PERMUTED = ("attn_q.weight", "attn_k.weight")


def rounding_steps(tensor: gguf.ReaderTensor) -> np.ndarray:
    """The grid step of every weight of a quantized [out, in] tensor, from its block scales."""
    kind = tensor.tensor_type
    rows = int(tensor.shape[-1])
    block_size, type_size = GGML_QUANT_SIZES[kind]
    blocks = tensor_bytes(tensor).reshape(-1, type_size)
    d = BLOCK_SCALES[kind].read(blocks)[:, 0]
    if kind in (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0):
        per_group, group = d[:, None], block_size
    elif kind in (Q.Q4_K, Q.Q5_K):  # 8 groups of 32, each with a 6-bit scale
        scales = blocks[:, 4:4 + Q4_K.K_SCALE_SIZE]
        sc, _ = (Q4_K if kind == Q.Q4_K else Q5_K).get_scale_min(scales)
        per_group, group = d[:, None] * sc, 32
    elif kind == Q.Q6_K:  # 16 groups of 16, each with an int8 scale
        scales = blocks[:, 192:208].view(np.int8).astype(np.float32)
        per_group, group = d[:, None] * np.abs(scales), 16
    else:
        raise AssertionError(f"no rounding step for {kind.name} in this test")
    return np.repeat(per_group.reshape(-1), group).reshape(rows, -1)


def rms(values: torch.Tensor) -> float:
    return float(values.double().pow(2).mean().sqrt())


@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def real_gguf(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A real GGUF file, its dequantized base, a k=32 edit over all three sites folded into
    it, and the folded file as transformers loads it."""
    if request.param == "smollm2":
        source, folder = smollm2_gguf_path(), request.getfixturevalue("smollm2_dir")
    else:
        source, folder = request.getfixturevalue("gemma3_gguf"), request.getfixturevalue("gemma3_dir")
    base, tokenizer, _ = load_model(folder, dtype="float32")
    out = tmp_path_factory.mktemp("gguf") / "folded"
    edit = export(source, random_plan(base), k=32, alpha=0.5, out=out, format="gguf").edit
    assert {unit.site for unit in edit.units} == {"head", "mlp", "mlp-out"}
    folded_file = out / source.name
    folded = AutoModelForCausalLM.from_pretrained(str(out), gguf_file=source.name,
                                                  dtype=torch.float32).eval()
    return request.param, source, base, tokenizer, edit, folded_file, folded


@pytest.mark.slow
def test_real_gguf_fold_adds_under_a_tenth_of_the_formats_noise(real_gguf) -> None:
    name, source, base, tokenizer, edit, _, folded = real_gguf
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    keep = batch["attention_mask"].bool()
    with torch.no_grad():
        plain = base(**batch).logits[keep]
        with steer(base, edit):
            hooked = base(**batch).logits[keep]
        fold_error = rms(folded(**batch).logits[keep] - hooked) / rms(hooked)
        # The noise floor: every quantized weight moved by uniform noise of one grid step.
        tensors = gguf_tensors(source)
        names = gguf.get_tensor_name_map(GGUF_ARCH[base.config.model_type],
                                         base.config.num_hidden_layers)
        noised = type(base)(base.config).eval()
        noised.load_state_dict(base.state_dict())
        generator = np.random.default_rng(0)
        for parameter_name, parameter in noised.named_parameters():
            gguf_name = names.get_name(parameter_name, try_suffixes=(".weight",))
            tensor = tensors.get(gguf_name or "")
            if tensor is None or tensor.tensor_type in (Q.F32, Q.F16, Q.BF16) or (
                    gguf_name.endswith(PERMUTED)):
                continue
            steps = rounding_steps(tensor)
            noise = generator.uniform(-0.5, 0.5, steps.shape).astype(np.float32) * steps
            parameter.data += torch.from_numpy(noise).reshape(parameter.shape)
        noise_floor = rms(noised(**batch).logits[keep] - plain) / rms(plain)
    edit_effect = rms(hooked - plain) / rms(plain)
    print(f"\n{name} {source.name}: edit effect {edit_effect:.4f}, fold error vs hooks "
          f"{fold_error:.5f}, format noise floor {noise_floor:.4f} (relative RMS logits): "
          f"the fold adds {fold_error / noise_floor:.1%} of the format's noise")
    assert fold_error <= 0.1 * noise_floor


@pytest.mark.slow
def test_real_gguf_fold_keeps_every_byte_it_does_not_need(real_gguf) -> None:
    _, source, _, _, edit, folded_file, _ = real_gguf
    model = read_gguf_model(source)
    edits = gguf_tensor_edits(edit, model)
    before, after = model.tensors, gguf_tensors(folded_file)
    assert list(before) == list(after)
    methods = set()
    for name, old in before.items():
        new = after[name]
        if name not in edits:
            assert new.tensor_type == old.tensor_type, name
            assert np.array_equal(tensor_bytes(new), tensor_bytes(old)), name
        elif name.endswith("attn_output.weight"):  # head units: columns, re-encoded to Q8_0
            assert new.tensor_type == Q.Q8_0, name
            exact = fold_tensor(torch.from_numpy(dequantize(np.asarray(old.data), old.tensor_type)),
                                edits[name])
            assert np.array_equal(np.asarray(new.data), quantize(exact.numpy(), Q.Q8_0)), name
            methods.add("re-encoded")
        else:  # rows of ffn_down (mlp-out) and of the gated ffn_up (mlp): block scales only
            assert new.tensor_type == old.tensor_type, name
            type_size = GGML_QUANT_SIZES[old.tensor_type][1]
            changed = (tensor_bytes(new) != tensor_bytes(old)).reshape(-1, type_size)
            assert changed.any() and not (changed.any(0) & ~scale_field_bytes(old.tensor_type)).any()
            rows = np.flatnonzero(changed.reshape(int(old.shape[-1]), -1).any(-1))
            assert set(rows) <= set(edits[name].edited()[0].tolist()), name
            methods.add(name.split(".")[-2])
    assert methods == {"re-encoded", "ffn_down", "ffn_up"}
