"""GGUF adapters per architecture: tiny transformers models built from their configs (no downloads).

For Llama, Mistral, Mixtral, Qwen2, Qwen3, Qwen2-MoE, Qwen3-MoE, Gemma 2, Gemma 3 and Phi-3: a random
LoRA on every weight matrix of the model's checkpoint (its saved names: Mixtral's and Qwen-MoE's
per-expert ``…experts.{e}.…``) is converted to GGUF with the model as ``--base`` and read back, with
every ΔW equal. The slow test puts the same PEFT adapter through llama.cpp's own
``convert_lora_to_gguf.py`` (from the llama-cpp-python sdist, ``make llama-ref``) and requires the
same tensors, shapes and ΔW — q/k permutation and expert stacking included — and that loratools reads
llama.cpp's file back to the source adapter.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import loratools as lt
from loratools.adapter import Adapter, Module
from loratools.config import AdapterConfig
from loratools.convert import convert_file
from loratools.deltas import check_same_deltas
from loratools.formats import load_base
from loratools.errors import UnsupportedModuleError
from loratools.formats.gguf import GGUFBase, base_from_hparams, gguf_base, read_gguf, write_gguf

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent
LLAMA_CPP = ROOT / ".cache" / "llama.cpp" / "src"
RANK, ALPHA = 4, 8.0
_COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, tie_word_embeddings=False, max_position_embeddings=128)


def _configs() -> dict[str, object]:
    T = transformers
    moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)
    return {
        "llama": T.LlamaConfig(**_COMMON),
        "mistral": T.MistralConfig(**_COMMON),
        "mixtral": T.MixtralConfig(**_COMMON, num_local_experts=4, num_experts_per_tok=2),
        "qwen2": T.Qwen2Config(**_COMMON),
        "qwen3": T.Qwen3Config(**_COMMON, head_dim=16),
        "qwen2_moe": T.Qwen2MoeConfig(**_COMMON, **moe, shared_expert_intermediate_size=48),
        "qwen3_moe": T.Qwen3MoeConfig(**_COMMON, **moe, head_dim=16),
        "gemma2": T.Gemma2Config(**{**_COMMON, "tie_word_embeddings": True}, head_dim=16),  # gemma2 has no output
        "gemma3": T.Gemma3TextConfig(**_COMMON, head_dim=16),
        "phi3": T.Phi3Config(**_COMMON, pad_token_id=0),
    }


ARCHS = list(_configs())
# llama.cpp architecture and the tensors each tiny model's adapter must produce in layer 0
EXPECT = {
    "llama": ("llama", {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"}),
    "mistral": ("llama", {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"}),
    "mixtral": ("llama", {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate_inp", "ffn_gate_exps",
                          "ffn_up_exps", "ffn_down_exps"}),
    "qwen2": ("qwen2", {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"}),
    "qwen3": ("qwen3", {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"}),
    "qwen2_moe": ("qwen2moe", {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate_inp", "ffn_gate_exps",
                               "ffn_up_exps", "ffn_down_exps", "ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp",
                               "ffn_gate_inp_shexp"}),
    "qwen3_moe": ("qwen3moe", {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate_inp", "ffn_gate_exps",
                               "ffn_up_exps", "ffn_down_exps"}),
    "gemma2": ("gemma2", {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"}),
    "gemma3": ("gemma3", {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"}),
    "phi3": ("phi3", {"attn_qkv", "attn_output", "ffn_up", "ffn_down"}),
}


def _weights(model_dir: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return {k[: -len(".weight")]: tuple(f.get_slice(k).get_shape()) for k in f.keys()
                if k.endswith(".weight") and len(f.get_slice(k).get_shape()) == 2}


def _random_lora(model_dir: Path, seed: int, skip: tuple[str, ...] = ()) -> Adapter:
    """rank 4, alpha 8 on every weight matrix of the checkpoint (embed_tokens as an embedding LoRA)."""
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for name, (out, inp) in _weights(model_dir).items():
        if any(s in name for s in skip):
            continue
        if name == "model.embed_tokens":  # weight (vocab, dim): A (r, vocab), B (dim, r)
            mods[name] = Module(A=torch.randn(RANK, out, generator=g), B=torch.randn(inp, RANK, generator=g),
                                alpha=ALPHA, scale=ALPHA / RANK, kind="embedding")
        else:
            mods[name] = Module(A=torch.randn(RANK, inp, generator=g), B=torch.randn(out, RANK, generator=g) * 0.1,
                                alpha=ALPHA, scale=ALPHA / RANK)
    return Adapter(mods, AdapterConfig(base_model=str(model_dir), task_type="CAUSAL_LM"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """arch → (tiny model directory, PEFT adapter directory)."""
    root = tmp_path_factory.mktemp("arch")
    out = {}
    for i, (arch, cfg) in enumerate(_configs().items()):
        torch.manual_seed(i)
        model_dir = root / arch
        transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(model_dir)
        skip = ("embed_tokens",) if arch == "gemma3" else ()  # see test_refusals_per_architecture
        peft_dir = lt.write_adapter(_random_lora(model_dir, seed=i, skip=skip), root / f"{arch}-lora", format="peft")
        out[arch] = (model_dir, peft_dir)
    return out


def _layer0(path: Path) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """layer-0 tensor → (lora_a shape, lora_b shape) in numpy order."""
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        g, _, ab = t.name.rpartition(".weight.lora_")
        shapes.setdefault(g, {})[ab] = tuple(int(x) for x in reversed(list(t.shape)))
    return {g[len("blk.0."):]: (s["a"], s["b"]) for g, s in shapes.items() if g.startswith("blk.0.")}


@pytest.mark.parametrize("arch", ARCHS)
def test_convert_to_gguf_and_back(arch: str, tiny, tmp_path: Path) -> None:
    model_dir, peft_dir = tiny[arch]
    source = lt.read_adapter(peft_dir)
    out = tmp_path / "a.gguf"
    convert_file(peft_dir, out, to="gguf", base=model_dir)  # itself reads the file back and checks every ΔW
    llama_arch, tensors = EXPECT[arch]
    r = gguf.GGUFReader(str(out))
    assert r.get_field("general.architecture").contents() == llama_arch
    layer0 = _layer0(out)
    assert set(layer0) == tensors
    for g, (a, b) in layer0.items():
        if g.endswith("_exps"):  # all experts stacked, one rank: (E, r, in), (E, out, r)
            assert a[:2] == (4, RANK) and b[0] == 4 and b[2] == RANK, (g, a, b)
        else:
            assert a[0] == RANK and b[1] == RANK, (g, a, b)
    back = read_gguf(out)  # no base: the names and head counts loratools wrote are enough
    assert set(back.modules) == set(source.modules)
    assert check_same_deltas(source, back) < 1e-6


def test_base_from_config_per_architecture(tiny) -> None:
    import json

    for arch, (model_dir, _) in tiny.items():
        b = base_from_hparams(json.loads((model_dir / "config.json").read_text()))
        assert b.arch == EXPECT[arch][0]
        assert b.n_expert == (4 if "moe" in arch or arch == "mixtral" else None), arch
        assert b.tied_embeddings == (arch == "gemma2"), arch


def test_experts_left_out_or_of_smaller_rank(tiny, tmp_path: Path) -> None:
    """Experts stack into one tensor of one rank: a missing expert is zeros, a smaller rank zero-padded; both
    read back as they were (zero experts dropped)."""
    model_dir, _ = tiny["mixtral"]
    g = torch.Generator().manual_seed(5)
    mods = {}
    for e, r in [(0, 2), (2, 5), (3, 1)]:  # expert 1 has no adapter
        for w, (out, inp) in [("w1", (96, 64)), ("w2", (64, 96))]:
            mods[f"model.layers.1.block_sparse_moe.experts.{e}.{w}"] = Module(
                A=torch.randn(r, inp, generator=g), B=torch.randn(out, r, generator=g), alpha=float(2 * r), scale=2.0)
    src = Adapter(mods, AdapterConfig(base_model=str(model_dir)))
    out = tmp_path / "e.gguf"
    write_gguf(src, out, base=GGUFBase("llama", 4, 2, n_expert=4))
    shapes = {t.name: tuple(int(x) for x in reversed(list(t.shape))) for t in gguf.GGUFReader(str(out)).tensors}
    assert shapes["blk.1.ffn_gate_exps.weight.lora_a"] == (4, 5, 64)
    assert shapes["blk.1.ffn_down_exps.weight.lora_b"] == (4, 64, 5)
    back = read_gguf(out)
    assert set(back.modules) == set(mods)
    assert check_same_deltas(src, back) < 1e-6


def test_refusals_per_architecture(tiny) -> None:
    model_dir, _ = tiny["gemma3"]
    emb = _random_lora(model_dir, 0, skip=("layers", "lm_head"))
    with pytest.raises(UnsupportedModuleError, match="Gemma 3's embedding rows"):
        write_gguf(emb, Path(os.devnull), base=GGUFBase("gemma3"))
    model_dir, _ = tiny["llama"]
    head = _random_lora(model_dir, 0, skip=("layers", "embed_tokens"))  # lm_head only
    with pytest.raises(UnsupportedModuleError, match="gemma2 architecture has no tensor"):
        write_gguf(head, Path(os.devnull), base=GGUFBase("gemma2"))  # gemma2 ties lm_head: no output tensor
    experts = _random_lora(tiny["mixtral"][0], 0, skip=("self_attn", "gate", "lm_head", "embed"))
    with pytest.raises(lt.LoraToolsError, match="expert"):
        write_gguf(experts, Path(os.devnull), base=GGUFBase("llama", 4, 2))  # the expert count is unknown


def _llama_cpp_convert(pairs: list[tuple[Path, Path, Path]]) -> None:
    """Run llama.cpp's convert_lora_to_gguf.py (base dir, adapter dir → out) in one interpreter."""
    driver = ("import runpy, sys\n"
              f"sys.path.insert(0, {str(LLAMA_CPP)!r})\n"
              f"for base, lora, out in {[tuple(map(str, p)) for p in pairs]!r}:\n"
              "    sys.argv = ['convert_lora_to_gguf.py', '--base', base, '--outfile', out, lora]\n"
              f"    runpy.run_path({str(LLAMA_CPP / 'convert_lora_to_gguf.py')!r}, run_name='__main__')\n")
    r = subprocess.run([sys.executable, "-c", driver], capture_output=True, text=True, cwd=LLAMA_CPP, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]


def _deltas(path: Path) -> dict[str, torch.Tensor]:
    """llama.cpp's ΔW per tensor, as its runtime computes it: alpha/rank · b @ a (per expert when stacked)."""
    r = gguf.GGUFReader(str(path))
    alpha = float(r.get_field("adapter.lora.alpha").contents())
    t = {x.name: torch.from_numpy(x.data.reshape(tuple(int(s) for s in reversed(list(x.shape)))).copy()).double()
         for x in r.tensors}
    out = {}
    for name in t:
        if name.endswith(".lora_a"):
            g = name[: -len(".weight.lora_a")]
            a, b = t[name], t[f"{g}.weight.lora_b"]
            a = a.T if g == "token_embd" else a
            out[g] = alpha / b.shape[-1] * (b @ a)
    return out


@pytest.mark.slow
def test_same_tensors_as_llama_cpp_converter(tiny, tmp_path: Path) -> None:
    if not (LLAMA_CPP / "convert_lora_to_gguf.py").is_file():
        pytest.skip(f"llama.cpp's sources are not unpacked at {LLAMA_CPP}: run `make llama-ref`")
    jobs = [(model_dir, peft_dir, tmp_path / f"{arch}-llama.cpp.gguf") for arch, (model_dir, peft_dir) in tiny.items()]
    _llama_cpp_convert(jobs)
    for arch, (model_dir, peft_dir) in tiny.items():
        theirs = tmp_path / f"{arch}-llama.cpp.gguf"
        ours = tmp_path / f"{arch}-loratools.gguf"
        convert_file(peft_dir, ours, to="gguf", base=model_dir)
        assert _layer0(ours) == _layer0(theirs), arch
        want, got = _deltas(theirs), _deltas(ours)
        assert set(got) == set(want), arch
        for g in want:
            assert torch.allclose(got[g], want[g], rtol=1e-5, atol=1e-6), (arch, g)
        # llama.cpp's file records no transformers names nor head counts: read it with the base's config
        back = gguf_base(load_base(model_dir))
        assert check_same_deltas(lt.read_adapter(peft_dir), read_gguf(theirs, base=back)) < 1e-5, arch
