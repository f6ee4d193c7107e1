"""Properties of the kohya and GGUF writers on random adapters, and damaged inputs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import loratools as lt
from loratools.adapter import Adapter, Module
from loratools.config import AdapterConfig
from loratools.convert import convert_adapter
from loratools.deltas import check_same_deltas
from loratools.errors import InvalidOptionError, LoraToolsError, MissingModuleError
from loratools.formats.gguf import permute_rows, read_gguf, unpermute_rows, write_gguf, GGUFBase
from loratools.formats.kohya import read_kohya, write_kohya

gguf = pytest.importorskip("gguf")

PROJ = [("self_attn.q_proj", 32, 32), ("self_attn.k_proj", 16, 32), ("self_attn.v_proj", 16, 32),
        ("self_attn.o_proj", 32, 32), ("mlp.gate_proj", 48, 32), ("mlp.up_proj", 48, 32), ("mlp.down_proj", 32, 48)]


@st.composite
def adapters(draw) -> Adapter:
    """Random LoRA/rsLoRA/AdaLoRA adapters on a 2-layer Llama (4 heads, 2 KV heads, head dim 8)."""
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    method = draw(st.sampled_from(["lora", "rslora", "adalora"]))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    mods: dict[str, Module] = {}
    chosen = draw(st.lists(st.tuples(st.integers(0, 1), st.integers(0, len(PROJ) - 1)), min_size=1, max_size=6, unique=True))
    init_r = 6
    for layer, j in chosen:
        name, out, inp = PROJ[j]
        r = draw(st.integers(1, 6)) if method != "adalora" else draw(st.integers(0, init_r))
        alpha = draw(st.sampled_from([1.0, 3.0, 8.0, 16.0, 0.5]))
        A = torch.randn(r, inp, generator=g).to(dtype)
        B = torch.randn(out, r, generator=g).to(dtype)
        if method == "adalora":
            E = torch.randn(r, 1, generator=g).to(dtype)
            mods[f"model.layers.{layer}.{name}"] = Module(A=A, B=B, E=E, alpha=12.0, scale=12.0 / (init_r + 1e-5))
        else:
            scale = alpha / math.sqrt(r) if method == "rslora" else alpha / r
            mods[f"model.layers.{layer}.{name}"] = Module(A=A, B=B, alpha=alpha, scale=scale)
    cfg = AdapterConfig(method="adalora", init_r=init_r) if method == "adalora" else \
        AdapterConfig(use_rslora=method == "rslora")
    return Adapter(mods, cfg)


BASE = GGUFBase("llama", 4, 2)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(adapter=adapters())
def test_kohya_and_gguf_keep_every_delta(tmp_path: Path, adapter: Adapter) -> None:
    if all(m.rank == 0 for m in adapter.modules.values()):
        with pytest.raises(InvalidOptionError, match="rank 0"):
            convert_adapter(adapter, to="kohya")
        return
    for to, write, read in [("kohya", write_kohya, read_kohya),
                            ("gguf", lambda a, p: write_gguf(a, p, base=BASE), lambda p: read_gguf(p, base=BASE))]:
        plain = convert_adapter(adapter, to=to).adapter
        path = tmp_path / f"x-{to}"
        path.unlink(missing_ok=True)
        write(plain, path)
        check_same_deltas(adapter, read(path))


@given(heads=st.integers(1, 6), half=st.integers(1, 5), cols=st.integers(1, 3))
def test_permutation_is_inverted(heads: int, half: int, cols: int) -> None:
    W = torch.randn(heads * half * 2, cols)
    P = permute_rows(W, heads)
    assert torch.equal(unpermute_rows(P, heads), W)
    assert sorted(P[:, 0].tolist()) == sorted(W[:, 0].tolist())


def test_damaged_files_fail_with_one_line(tmp_path: Path, adapters: Path) -> None:
    good = tmp_path / "g.gguf"
    lt.convert_file(adapters / "lora", good, to="gguf")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(LoraToolsError) as e:
        lt.read_adapter(cut)
    assert "\n" not in str(e.value)
    half = tmp_path / "half.safetensors"
    save_file({"lora_te_x.lora_down.weight": torch.zeros(2, 4), "lora_te_y.lora_up.weight": torch.zeros(4, 2),
               "lora_te_y.lora_down.weight": torch.zeros(2, 4)}, str(half))
    with pytest.raises(MissingModuleError, match="lora_te_x.lora_up.weight"):
        lt.read_adapter(half)


def test_gguf_f16_tensors_read(tmp_path: Path) -> None:
    p = tmp_path / "f16.gguf"
    a, b = torch.randn(4, 32).half().numpy(), torch.randn(16, 4).half().numpy()
    w = gguf.GGUFWriter(str(p), "llama")
    w.add_type("adapter"), w.add_string("adapter.type", "lora"), w.add_float32("adapter.lora.alpha", 8.0)
    w.add_tensor("blk.0.attn_v.weight.lora_a", a), w.add_tensor("blk.0.attn_v.weight.lora_b", b)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    m = lt.read_adapter(p).modules["model.layers.0.self_attn.v_proj"]
    want = 2.0 * (torch.from_numpy(b).double() @ torch.from_numpy(a).double())  # alpha/rank = 8/4
    assert torch.allclose(m.delta(dtype=torch.float64), want, rtol=1e-12, atol=0)
