"""loratools convert: round trips keep every ΔW, checked against peft's own merge and dense float64."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import loratools as lt
from loratools.adapter import Adapter, Module
from loratools.convert import convert_adapter, convert_file
from loratools.deltas import check_same_deltas
from loratools.errors import ConversionCheckError
from loratools.errors import UnsupportedModuleError, WrongBaseError
from loratools.formats import load_base
from loratools.formats.kohya import read_kohya

gguf = pytest.importorskip("gguf")

FIXTURE_ADAPTERS = ["lora", "rslora", "adalora"]


@pytest.fixture(scope="module")
def peft_deltas() -> dict[str, dict[str, torch.Tensor]]:
    """ΔW per base weight of each fixture adapter, as peft itself computes it (merge − base, in float64)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root = Path(__file__).resolve().parent.parent / "fixtures"
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name in FIXTURE_ADAPTERS:
        base = AutoModelForCausalLM.from_pretrained(root / "tiny-llama", dtype=torch.float64)
        before = {k: v.clone().double() for k, v in base.state_dict().items()}
        merged = PeftModel.from_pretrained(base, root / "adapters" / name).merge_and_unload()
        after = merged.state_dict()
        out[name] = {k[: -len(".weight")]: after[k].double() - before[k] for k in before
                     if not torch.equal(after[k].double(), before[k])}
    return out


def _dense(adapter: Adapter) -> dict[str, torch.Tensor]:
    return {n: m.delta(dtype=torch.float64) for n, m in adapter.items()}


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], tol: float = 1e-6) -> None:
    assert sorted(got) == sorted(want)
    for n in want:
        err = float((got[n] - want[n]).norm() / want[n].norm())
        assert err <= tol, f"{n}: relative ΔW error {err:.2e}"


@pytest.mark.parametrize("name", FIXTURE_ADAPTERS)
@pytest.mark.parametrize("via", ["kohya", "gguf"])
def test_round_trip_keeps_peft_delta(tmp_path: Path, adapters: Path, peft_deltas, name: str, via: str) -> None:
    mid = tmp_path / f"mid.{via}"
    res = convert_file(adapters / name, mid, to=via, base=adapters.parent / "tiny-llama")
    assert lt.detect_format(mid) == via and res.format == via
    back = tmp_path / "back"
    convert_file(mid, back, to="peft", base=adapters.parent / "tiny-llama")
    # independent reference: peft's own merge of the original adapter, in float64
    got = {n: d for n, d in _dense(lt.read_adapter(back)).items() if d.abs().max() > 0}
    _assert_same(got, peft_deltas[name])
    # and peft loads the round-tripped directory to the same merged weights
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(adapters.parent / "tiny-llama", dtype=torch.float64)
    w0 = {k: v.clone().double() for k, v in base.state_dict().items()}
    merged = PeftModel.from_pretrained(base, back).merge_and_unload().state_dict()
    again = {k[: -len(".weight")]: merged[k].double() - w0[k] for k in w0 if not torch.equal(merged[k].double(), w0[k])}
    _assert_same(again, peft_deltas[name])


def test_gguf_file_as_llama_cpp_reads_it(tmp_path: Path, adapters: Path, peft_deltas) -> None:
    """Read with gguf's own reader and apply llama.cpp's rule: ΔW = alpha/rank · b @ a, with q/k rows permuted."""
    out = tmp_path / "r.gguf"
    convert_file(adapters / "rslora", out, to="gguf", base=adapters.parent / "tiny-llama")
    r = gguf.GGUFReader(str(out))
    field = lambda k: r.get_field(k).contents()  # noqa: E731
    assert field("general.type") == "adapter" and field("adapter.type") == "lora"
    assert field("general.architecture") == "llama"
    alpha = float(field("adapter.lora.alpha"))
    tensors = {t.name: torch.from_numpy(t.data.copy()).double() for t in r.tensors}
    ranks = set()
    for layer in range(4):
        for hf, g, heads in [("self_attn.q_proj", "attn_q", 4), ("self_attn.k_proj", "attn_k", 2),
                             ("self_attn.v_proj", "attn_v", None), ("self_attn.o_proj", "attn_output", None),
                             ("mlp.gate_proj", "ffn_gate", None), ("mlp.up_proj", "ffn_up", None),
                             ("mlp.down_proj", "ffn_down", None)]:
            a, b = tensors[f"blk.{layer}.{g}.weight.lora_a"], tensors[f"blk.{layer}.{g}.weight.lora_b"]
            ranks.add(a.shape[0])
            got = alpha / b.shape[1] * (b @ a)
            want = peft_deltas["rslora"][f"model.layers.{layer}.{hf}"]
            if heads:  # llama.cpp's row order for q/k, written out index by index
                d = want.shape[0] // heads
                order = [h * d + half * (d // 2) + j for h in range(heads) for j in range(d // 2) for half in (0, 1)]
                want = want[order]
            assert float((got - want).norm() / want.norm()) < 1e-6, (layer, g)
    assert ranks == {2, 4, 12}  # mixed ranks (rank_pattern) with one global alpha


def test_adalora_becomes_plain_lora(adapters: Path) -> None:
    ada = lt.read_adapter(adapters / "adalora")
    conv = convert_adapter(ada, to="kohya")
    assert conv.adapter.method == "lora" and all(m.E is None for m in conv.adapter.modules.values())
    kept = {n for n, m in ada.items() if m.rank > 0}
    assert set(conv.adapter.modules) == kept and len(kept) < len(ada.modules)  # the rank-0 module adds nothing
    check_same_deltas(ada, conv.adapter)


def test_kohya_keeps_each_module_alpha(tmp_path: Path, adapters: Path) -> None:
    out = tmp_path / "k.safetensors"
    convert_file(adapters / "rslora", out, to="kohya")
    tensors = load_file(out)
    src = lt.read_adapter(adapters / "rslora")
    for name, m in src.items():
        key = "lora_te_" + name.replace(".", "_")
        r = tensors[key + ".lora_down.weight"].shape[0]
        # kohya's rule is alpha/r: the written alpha must reproduce rsLoRA's alpha/sqrt(r) · patterns
        assert abs(float(tensors[key + ".alpha"]) / r - m.scale) <= 1e-6 * m.scale
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "Dynamic" and meta["ss_network_alpha"] == "Dynamic"
    assert json.loads(meta["loratools_module_names"])["lora_te_model_layers_0_self_attn_q_proj"] == \
        "model.layers.0.self_attn.q_proj"


def _conv_adapter() -> Adapter:
    g = torch.Generator().manual_seed(0)
    mods = {
        "down_blocks.0.resnets.0.conv1": Module(A=torch.randn(4, 6, 3, 3, generator=g), B=torch.randn(5, 4, 1, 1, generator=g),
                                                alpha=2.0, scale=0.5, kind="conv"),
        "down_blocks.0.attentions.0.proj_in": Module(A=torch.randn(3, 6, 1, 1, generator=g),
                                                     B=torch.randn(6, 3, 1, 1, generator=g), alpha=3.0, scale=1.0,
                                                     kind="conv"),
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": Module(
            A=torch.randn(2, 6, generator=g), B=torch.randn(6, 2, generator=g), alpha=1.0, scale=0.5),
    }
    return Adapter(mods)


def test_kohya_conv_round_trip(tmp_path: Path) -> None:
    src = tmp_path / "conv.safetensors"
    lt.write_adapter(_conv_adapter(), src, format="loratools")
    k = tmp_path / "conv-kohya.safetensors"
    convert_file(src, k, to="kohya")
    keys = load_file(k)
    assert keys["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape == (4, 6, 3, 3)
    assert keys["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"].shape == (5, 4, 1, 1)
    back = tmp_path / "back.safetensors"
    convert_file(k, back, to="loratools")
    got = lt.read_adapter(back)
    # independent reference: run the two convolutions on an input, as the LoRA layer does
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    for name, m in _conv_adapter().items():
        n = got.modules[name]
        assert n.kind == m.kind
        if m.kind != "conv":
            continue
        pad = m.A.shape[-1] // 2
        want = m.scale * torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, m.A.double(), padding=pad), m.B.double())
        have = torch.nn.functional.conv2d(x, n.delta(dtype=torch.float64), padding=pad)
        assert torch.allclose(have, want, rtol=1e-6, atol=1e-9)


def _foreign_kohya(path: Path) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    t: dict[str, torch.Tensor] = {}
    for proj, out, alpha in [("q_proj", 128, None), ("k_proj", 64, torch.tensor([2.0])), ("v_proj", 64, torch.tensor(6.0))]:
        key = f"lora_te_model_layers_0_self_attn_{proj}"
        t[key + ".lora_down.weight"] = torch.randn(4, 128, generator=g).half()
        t[key + ".lora_up.weight"] = torch.randn(out, 4, generator=g).half()
        if alpha is not None:
            t[key + ".alpha"] = alpha.half()
    save_file(t, str(path), metadata={"ss_network_dim": "Dynamic", "ss_network_alpha": "Dynamic",
                                      "ss_network_module": "networks.lora"})
    return t


def test_foreign_kohya_file_reads_correctly(tmp_path: Path, tiny_llama: Path) -> None:
    f = tmp_path / "foreign.safetensors"
    t = _foreign_kohya(f)
    assert lt.detect_format(f) == "kohya"
    plain = lt.read_adapter(f)  # no base: flattened names are kept
    assert sorted(plain.modules) == sorted(k[: -len(".lora_down.weight")] for k in t if k.endswith("down.weight"))
    mapped = read_kohya(f, base_names=load_base(tiny_llama).module_names)
    for proj, alpha in [("q_proj", 4.0), ("k_proj", 2.0), ("v_proj", 6.0)]:  # missing alpha means alpha = r = 4
        key = f"lora_te_model_layers_0_self_attn_{proj}"
        want = alpha / 4 * (t[key + ".lora_up.weight"].double() @ t[key + ".lora_down.weight"].double())
        m = mapped.modules[f"model.layers.0.self_attn.{proj}"]
        assert torch.allclose(m.delta(dtype=torch.float64), want, rtol=1e-12, atol=0)
        assert m.alpha == alpha


def test_foreign_kohya_to_peft_with_base_maps_names(tmp_path: Path, tiny_llama: Path, cli) -> None:
    f = tmp_path / "foreign.safetensors"
    _foreign_kohya(f)
    r = cli("convert", f, "-o", tmp_path / "p", "--to", "peft")
    assert r.returncode == 0, r.stderr
    assert "flattened" in r.stderr and "--base" in r.stderr
    assert "lora_te_model_layers_0_self_attn_q_proj" in lt.read_adapter(tmp_path / "p").modules
    r = cli("convert", f, "-o", tmp_path / "p2", "--to", "peft", "--base", tiny_llama)
    assert r.returncode == 0, r.stderr
    cfg = json.loads((tmp_path / "p2" / "adapter_config.json").read_text())
    assert sorted(lt.read_adapter(tmp_path / "p2").modules) == [f"model.layers.0.self_attn.{p}" for p in ("k_proj", "q_proj", "v_proj")]
    assert cfg["alpha_pattern"] or cfg["lora_alpha"]  # per-module alphas survive into PEFT


def test_round_trip_keeps_fingerprint(tmp_path: Path, adapters: Path) -> None:
    src = lt.read_adapter(adapters / "rslora")
    for to in ("kohya", "gguf"):
        out = tmp_path / f"x.{to}"
        convert_file(adapters / "rslora", out, to=to)
        assert lt.read_adapter(out).fingerprint.sha256 == src.fingerprint.sha256


def test_check_catches_a_wrong_delta(adapters: Path) -> None:
    a = lt.read_adapter(adapters / "lora")
    name, m = next(iter(a.items()))
    bad = a.with_modules({**a.modules, name: m.with_factors(scale=m.scale * (1 + 1e-4))})
    with pytest.raises(ConversionCheckError, match=name):
        check_same_deltas(a, bad)


def test_unsupported_modules_library(adapters: Path) -> None:
    conv = _conv_adapter()
    with pytest.raises(UnsupportedModuleError) as e:
        convert_adapter(conv, to="gguf", base=load_base(adapters.parent / "tiny-llama"))
    assert "down_blocks.0.resnets.0.conv1" in str(e.value) and "--drop-unsupported" in str(e.value)
    lora = lt.read_adapter(adapters / "lora")
    with_saved = Adapter(lora.modules, lora.config, {"base_model.model.lm_head.weight": torch.zeros(259, 128)})
    with pytest.raises(UnsupportedModuleError, match="lm_head"):
        convert_adapter(with_saved, to="kohya")
    kept = convert_adapter(with_saved, to="gguf", base=load_base(adapters.parent / "tiny-llama"),
                   drop_unsupported=True)
    assert list(kept.dropped) == ["base_model.model.lm_head.weight"] and not kept.adapter.saved


def test_non_llama_base_is_refused(tmp_path: Path, adapters: Path) -> None:
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(WrongBaseError, match="GPT2LMHeadModel"):
        convert_file(adapters / "lora", tmp_path / "x.gguf", to="gguf", base=tmp_path / "gpt2")
    assert not (tmp_path / "x.gguf").exists()


def test_gguf_needs_the_gguf_package(tmp_path: Path, adapters: Path, monkeypatch) -> None:
    import sys

    from loratools.errors import MissingDependencyError

    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf now fails as if not installed
    with pytest.raises(MissingDependencyError, match=r"loratools\[gguf\]"):
        convert_file(adapters / "lora", tmp_path / "x.gguf", to="gguf", base=adapters.parent / "tiny-llama")
    assert list(tmp_path.iterdir()) == []


def test_gguf_embeddings_and_lm_head(tmp_path: Path, tiny_llama: Path) -> None:
    """token_embd's lora_a is stored (vocab, r): llama.cpp gathers token rows of it, then applies lora_b."""
    from loratools.formats.gguf import GGUFBase, gguf_unsupported

    g = torch.Generator().manual_seed(3)
    mods = {
        "model.embed_tokens": Module(A=torch.randn(3, 259, generator=g), B=torch.randn(128, 3, generator=g), alpha=6.0,
                                     scale=2.0, kind="embedding"),
        "lm_head": Module(A=torch.randn(2, 128, generator=g), B=torch.randn(259, 2, generator=g), alpha=2.0, scale=1.0),
    }
    src = tmp_path / "emb.safetensors"
    lt.write_adapter(Adapter(mods), src, format="loratools")
    out = tmp_path / "emb.gguf"
    convert_file(src, out, to="gguf", base=tiny_llama)
    r = gguf.GGUFReader(str(out))
    t = {x.name: torch.from_numpy(x.data.copy()).double() for x in r.tensors}
    alpha = float(r.get_field("adapter.lora.alpha").contents())
    a, b = t["token_embd.weight.lora_a"], t["token_embd.weight.lora_b"]
    assert a.shape == (259, 3) and b.shape == (128, 3)
    m = mods["model.embed_tokens"]
    tokens = torch.tensor([0, 5, 258])
    rows = (alpha / b.shape[1]) * (b @ a[tokens].T).T  # llama.cpp: scale · lora_b · get_rows(lora_a, tokens)
    want = m.scale * (m.B.double() @ m.A.double()[:, tokens]).T  # PEFT's embedding ΔW rows
    assert torch.allclose(rows, want, rtol=1e-6, atol=1e-9)
    assert {"output.weight.lora_a", "output.weight.lora_b"} <= set(t)
    back = lt.read_adapter(out)
    assert back.modules["model.embed_tokens"].kind == "embedding"
    check_same_deltas(Adapter(mods), back)
    # a base that ties lm_head to the embeddings has no `output` tensor in llama.cpp
    assert "lm_head" in gguf_unsupported(Adapter(mods), GGUFBase("llama", 4, 2, tied_embeddings=True))
    with pytest.raises(UnsupportedModuleError, match="embed_tokens"):
        convert_adapter(Adapter(mods), to="kohya")


def test_foreign_kohya_to_gguf(tmp_path: Path, tiny_llama: Path) -> None:
    f = tmp_path / "foreign.safetensors"
    _foreign_kohya(f)
    with pytest.raises(UnsupportedModuleError, match="--base"):
        convert_adapter(lt.read_adapter(f), to="gguf", base=load_base(tiny_llama))  # names still flattened
    res = convert_file(f, tmp_path / "x.gguf", to="gguf", base=tiny_llama)
    assert res.modules == 3 and not res.notes
    assert {t.name for t in gguf.GGUFReader(str(tmp_path / "x.gguf")).tensors} == \
        {f"blk.0.attn_{p}.weight.lora_{x}" for p in "qkv" for x in "ab"}
