"""Merges that used to finish with exit 0 and a wrong model, now refused by name or done right.

Each test fails on the code before its fix: a GGUF merge took a DoRA adapter as plain LoRA and dropped a
``lora_bias``; a GGUF un-merge checked the stamp's shapes only (any weight, any adapter of the same shapes);
``export --for llama.cpp --base OTHER`` permuted q/k for OTHER's heads; ``merge --dtype float16`` wrote inf
from a full tensor beyond float16's range.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from loratools import read_adapter
from loratools.adapter import Adapter
from loratools.errors import InvalidOptionError, MissingModuleError, ShapeMismatchError, UnsupportedConfigError
from loratools.errors import WrongBaseError
from loratools.merge.jobs import merge_model, unmerge_model, verify_merge

from helpers import tiny_llama_model
from test_merge_gguf import HEADS, _permute, _tensors, _write_gguf, tiny  # noqa: F401  (tiny: the fixture)

gguf = pytest.importorskip("gguf")
Q = "model.layers.0.self_attn.q_proj"
TINY = Path(__file__).resolve().parent.parent / "fixtures" / "tiny-llama"


def _with(ad: Adapter, name: str, **change: object) -> Adapter:
    """``ad`` with module ``name``'s fields changed."""
    return Adapter({**ad.modules, name: dataclasses.replace(ad.modules[name], **change)}, ad.config, ad.saved)


# ---- 1. GGUF merge: DoRA refused by name, lora_bias merged or refused as for safetensors ------------------------

def test_gguf_merge_refuses_dora_by_module_in_merge_verify_and_unmerge(tiny: dict, tmp_path: Path) -> None:
    ad = read_adapter(tiny["adapter"])
    dora = _with(ad, Q, magnitude=torch.full((256,), 0.5))
    with pytest.raises(UnsupportedConfigError, match=rf"{Q}: use_dora = True .*safetensors"):
        merge_model(tiny["gguf"], [dora], tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()
    with pytest.raises(UnsupportedConfigError, match=Q):
        merge_model(tiny["gguf"], [dora], tmp_path / "r.gguf", record=tmp_path / "r.rec")
    assert not (tmp_path / "r.gguf").exists() and not (tmp_path / "r.rec").exists()
    merge_model(tiny["gguf"], [ad], tmp_path / "plain.gguf", quant="f32")
    with pytest.raises(UnsupportedConfigError, match=Q):
        verify_merge(tiny["gguf"], [dora], tmp_path / "plain.gguf")
    with pytest.raises(UnsupportedConfigError, match=Q):
        unmerge_model(tmp_path / "plain.gguf", [dora], tmp_path / "u.gguf", ignore_stamp=True)


def test_gguf_lora_bias_without_a_base_bias_is_refused_as_for_safetensors(tiny: dict, tmp_path: Path) -> None:
    ad = _with(read_adapter(tiny["adapter"]), Q, bias=torch.randn(256))
    with pytest.raises(MissingModuleError) as got:
        merge_model(tiny["gguf"], [ad], tmp_path / "m.gguf")
    assert str(got.value).startswith("blk.0.attn_q.bias is missing from the base model (the adapter has a LoRA bias")
    assert not (tmp_path / "m.gguf").exists()
    # the very words of the safetensors merge (one check: merge.plan.check_bias)
    lora = read_adapter(TINY.parent / "adapters" / "lora")
    name = next(n for n in lora.modules if n.endswith("q_proj"))
    out = lora.modules[name].B.shape[0]
    with pytest.raises(MissingModuleError) as st:
        merge_model(TINY, [_with(lora, name, bias=torch.randn(out))], tmp_path / "st", device="cpu")
    assert str(st.value).split(" (", 1)[1] == str(got.value).split(" (", 1)[1]


def test_gguf_lora_bias_goes_into_the_base_bias_permuted_like_q(tiny: dict, tmp_path: Path) -> None:
    b0 = np.random.default_rng(3).normal(size=256).astype(np.float32)
    _write_gguf(tmp_path / "b.gguf", {**tiny["weights"], "blk.0.attn_q.bias": (b0, "F32")})
    lb = torch.randn(256, generator=torch.Generator().manual_seed(4))
    ad = _with(read_adapter(tiny["adapter"]), Q, bias=lb)
    rep = merge_model(tmp_path / "b.gguf", [ad], tmp_path / "m.gguf", quant="q8_0", verify=True)
    assert rep.adapted == len(tiny["exact"]) + 1
    got = _tensors(tmp_path / "m.gguf")
    want = b0.astype(np.float64) + _permute((ad.modules[Q].scale * lb).double().numpy(), HEADS)
    assert got["blk.0.attn_q.bias"].dtype == np.float32  # kept in its type, whatever `quant` says
    assert np.abs(got["blk.0.attn_q.bias"] - want).max() < 1e-5
    unmerge_model(tmp_path / "m.gguf", [ad], tmp_path / "u.gguf")
    assert np.abs(_tensors(tmp_path / "u.gguf")["blk.0.attn_q.bias"] - b0).max() < 1e-5


# ---- 2. GGUF un-merge: the stamp's content hash and weight, and ignore_stamp ------------------------------------

def test_gguf_unmerge_checks_the_stamps_weight_and_content(tiny: dict, tmp_path: Path) -> None:
    ad = read_adapter(tiny["adapter"])
    merge_model(tiny["gguf"], [ad], tmp_path / "m.gguf", quant="f32")
    with pytest.raises(WrongBaseError, match="merged with weight 1, not 0.5"):
        unmerge_model(tmp_path / "m.gguf", [(ad, 0.5)], tmp_path / "u.gguf")
    other = _with(ad, Q, B=ad.modules[Q].B * 2)  # the same shapes (fingerprint), other factors
    with pytest.raises(WrongBaseError, match="the same shapes but other factors"):
        unmerge_model(tmp_path / "m.gguf", [other], tmp_path / "u.gguf")
    assert not (tmp_path / "u.gguf").exists()
    unmerge_model(tmp_path / "m.gguf", [other], tmp_path / "u.gguf", ignore_stamp=True)  # on purpose: honoured
    assert (tmp_path / "u.gguf").exists()


def test_cli_gguf_unmerge_wrong_weight_is_one_line(tiny: dict, tmp_path: Path, cli) -> None:
    assert cli("merge", tiny["gguf"], tiny["adapter"], "-o", tmp_path / "m.gguf", "--quant", "f32").returncode == 0
    r = cli("unmerge", tmp_path / "m.gguf", tiny["adapter"], "--weight", "0.5", "-o", tmp_path / "u.gguf")
    assert r.returncode == 2 and "weight 1, not 0.5" in r.stderr and not (tmp_path / "u.gguf").exists(), r.stderr


# ---- 3. export --for llama.cpp/ollama --base OTHER: refused as convert refuses it -------------------------------

@pytest.mark.parametrize("runtime", ["llama.cpp", "ollama"])
def test_export_refuses_a_base_the_adapter_was_not_made_for(runtime: str, tmp_path: Path) -> None:
    from loratools.convert import convert_file
    from loratools.serve.check import check_file
    from loratools.serve.export import export_adapter

    other = tiny_llama_model(tmp_path / "other")  # hidden 32, 2 heads: not fixtures/tiny-llama (128, 4 heads)
    src = TINY.parent / "adapters" / "lora"
    with pytest.raises(ShapeMismatchError) as conv:
        convert_file(src, tmp_path / "c.gguf", to="gguf", base=other)
    out = tmp_path / ("o.gguf" if runtime == "llama.cpp" else "o")
    with pytest.raises(ShapeMismatchError) as exp:
        export_adapter(src, out, runtime=runtime, base=other)
    assert str(exp.value) == str(conv.value) and "made for another base model" in str(exp.value)
    assert not out.exists()
    with pytest.raises(ShapeMismatchError):  # `check --for RUNTIME --base OTHER` reads the source the same way
        check_file(src, runtime, base=other)
    export_adapter(src, out, runtime=runtime, base=TINY)  # its own base still exports


# ---- 4. merge --dtype float16: a full tensor beyond float16's range is refused, not written as inf ----------------

def test_float16_merge_refuses_a_saved_tensor_that_overflows(tmp_path: Path) -> None:
    lora = read_adapter(TINY.parent / "adapters" / "lora")
    head = torch.zeros(259, 128)
    head[3, 5] = 7e4
    ad = Adapter(lora.modules, lora.config, {"base_model.model.lm_head.weight": head})
    with pytest.raises(InvalidOptionError, match=r"lm_head\.weight holds 70000, beyond torch\.float16's range.*bfloat16"):
        merge_model(TINY, [ad], tmp_path / "m", dtype=torch.float16, device="cpu")
    assert not (tmp_path / "m").exists()
    merge_model(TINY, [ad], tmp_path / "b", dtype=torch.bfloat16, device="cpu")  # a wider dtype holds it
    assert merge_model(TINY, [ad], tmp_path / "f", device="cpu").adapted > 0


def test_float16_merge_of_a_delta_that_overflows_is_refused(tmp_path: Path) -> None:
    """Merged tensors were already checked (kernels.merge_rows): confirmed, naming the tensor."""
    lora = read_adapter(TINY.parent / "adapters" / "lora")
    name = next(n for n in lora.modules if n.endswith("q_proj"))
    big = _with(lora, name, B=lora.modules[name].B * 1e7)
    with pytest.raises(Exception, match=rf"{name}\.weight .*overflows torch\.float16"):
        merge_model(TINY, [big], tmp_path / "m", dtype=torch.float16, device="cpu")
    assert not (tmp_path / "m").exists()
