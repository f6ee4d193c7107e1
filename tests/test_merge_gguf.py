"""Merging into a GGUF model, against peft's own merge_and_unload on the same (dequantized) weights.

A tiny Llama (hidden 256, so K-quants hold its rows) is written as GGUF with a different tensor type per
projection; the reference permutes q/k rows with llama.cpp's formula (convert_hf_to_gguf.py
``LlamaModel.permute``, written out here in numpy) and adds peft's ΔW in float64.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from loratools import read_adapter
from loratools.errors import InvalidOptionError, MissingModuleError
from loratools.gguf.quants import dequantize, quantize
from loratools.io.gguf_model import open_gguf_model
from loratools.merge.jobs import merge_model, unmerge_model, verify_merge

gguf = pytest.importorskip("gguf")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

HEADS, KV_HEADS = 4, 2
#: tensor type per (layer, projection): every family loratools writes
TYPES = {
    (0, "q_proj"): "Q8_0", (0, "k_proj"): "Q4_0", (0, "v_proj"): "Q6_K", (0, "o_proj"): "F16",
    (0, "gate_proj"): "Q4_K", (0, "up_proj"): "Q4_1", (0, "down_proj"): "BF16",
    (1, "q_proj"): "Q5_K", (1, "k_proj"): "Q5_0", (1, "v_proj"): "Q3_K", (1, "o_proj"): "Q2_K",
    (1, "gate_proj"): "F32", (1, "up_proj"): "Q5_1", (1, "down_proj"): "Q8_0",
}
#: relative Frobenius error of one quantization to each type, generously (ΔW is ~the size of W0, so a merge
#: that drops ΔW, mis-scales it or misses the q/k permutation is off by ~1 and fails every bound)
REL = {"F32": 1e-6, "F16": 1e-3, "BF16": 8e-3, "Q8_0": 1e-2, "Q6_K": 2e-2, "Q5_K": 5e-2, "Q5_0": 5e-2,
       "Q5_1": 5e-2, "Q4_K": 0.1, "Q4_0": 0.12, "Q4_1": 0.1, "Q3_K": 0.2, "Q2_K": 0.4}
NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
         "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(path: Path, weights: dict[str, tuple[np.ndarray, str]], split: int = 0) -> None:
    w = gguf.GGUFWriter(str(path), "llama", split_max_tensors=split)
    w.add_uint32("llama.attention.head_count", HEADS)
    w.add_uint32("llama.attention.head_count_kv", KV_HEADS)
    w.add_uint32("llama.block_count", 2)
    w.add_string("general.name", "tiny")
    w.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(8)])
    for name, (a, t) in weights.items():
        if t == "F32":
            w.add_tensor(name, a.astype(np.float32))
        elif t == "F16":
            w.add_tensor(name, a.astype(np.float16))
        else:
            w.add_tensor(name, quantize(a, t), raw_dtype=gguf.GGMLQuantizationType[t])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The GGUF model, the peft adapter, and the exact merge (GGUF layout, float64) for each adapted tensor."""
    from peft import LoraConfig, PeftModel, get_peft_model

    d = tmp_path_factory.mktemp("gguf")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, vocab_size=64,
                                   num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, tie_word_embeddings=False)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    weights: dict[str, tuple[np.ndarray, str]] = {}
    sd = hf.state_dict()
    with torch.no_grad():
        for (layer, proj), t in TYPES.items():
            kind = "self_attn" if proj[0] in "qkvo" else "mlp"
            key = f"model.layers.{layer}.{kind}.{proj}.weight"
            heads = {"q_proj": HEADS, "k_proj": KV_HEADS}.get(proj)
            a = sd[key].numpy().copy()  # sd[key] is overwritten below
            g = _permute(a, heads) if heads else a
            weights[f"blk.{layer}.{NAMES[proj]}.weight"] = (g, t)
            back = dequantize(quantize(g, t), t, g.shape) if t not in ("F32", "F16") else g.astype(np.float16 if t == "F16" else np.float32).astype(np.float32)
            back = _permute_back(back, heads) if heads else back
            sd[key].copy_(torch.from_numpy(back))  # the HF model now holds exactly what the GGUF holds
        weights["token_embd.weight"] = (sd["model.embed_tokens.weight"].numpy(), "F32")
        weights["output.weight"] = (sd["lm_head.weight"].numpy(), "Q8_0")
        for i in range(2):
            weights[f"blk.{i}.attn_norm.weight"] = (np.ones(256, np.float32), "F32")
        sd_q = dict(sd)
        sd_q["lm_head.weight"] = torch.from_numpy(dequantize(quantize(weights["output.weight"][0], "Q8_0"), "Q8_0", (64, 256)))
        hf.load_state_dict(sd_q)
    _write_gguf(d / "tiny.gguf", weights)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(NAMES), init_lora_weights=False)
    pm = get_peft_model(hf, config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:  # ΔW about the size of W0 (std 0.02): B·A·2 with A,B ~ N(0, 0.1)
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    pm.save_pretrained(d / "adapter")
    merged = PeftModel.from_pretrained(_fresh(cfg, sd_q), d / "adapter").merge_and_unload().state_dict()
    exact = {}
    for (layer, proj), t in TYPES.items():
        kind = "self_attn" if proj[0] in "qkvo" else "mlp"
        m = merged[f"model.layers.{layer}.{kind}.{proj}.weight"].double().numpy()
        heads = {"q_proj": HEADS, "k_proj": KV_HEADS}.get(proj)
        exact[f"blk.{layer}.{NAMES[proj]}.weight"] = _permute(m, heads) if heads else m
    return {"dir": d, "gguf": d / "tiny.gguf", "adapter": d / "adapter", "exact": exact, "weights": weights}


def _permute_back(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _fresh(cfg, sd) -> torch.nn.Module:
    m = transformers.LlamaForCausalLM(cfg).eval()
    m.load_state_dict(sd)
    return m


def _tensors(path: Path) -> dict[str, np.ndarray]:
    r = gguf.GGUFReader(str(path))
    return {t.name: dequantize(t.data, t.tensor_type, tuple(int(x) for x in reversed(t.shape.tolist())))
            for t in r.tensors}


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b))


def test_merge_same_keeps_types_and_matches_peft_within_each_types_error(tiny: dict, tmp_path: Path) -> None:
    ad = read_adapter(tiny["adapter"])
    rep = merge_model(tiny["gguf"], [ad], tmp_path / "m.gguf")
    assert rep.adapted == len(TYPES)
    got, base = _tensors(tmp_path / "m.gguf"), _tensors(tiny["gguf"])
    types = {t.name: t.qtype for t in open_gguf_model(tmp_path / "m.gguf").all_tensors()}
    for name, exact in tiny["exact"].items():
        t = tiny["weights"][name][1]
        assert types[name] == t
        assert _rel(base[name], exact) > 0.5  # ΔW is large: a merge that drops or misplaces it fails below
        assert _rel(got[name], exact) < REL[t], (name, t)
    for name in ("token_embd.weight", "output.weight", "blk.0.attn_norm.weight"):
        assert np.array_equal(got[name], base[name])
    assert set(rep.quant) == {f"{t}→{t}" for t in TYPES.values()}
    q8 = rep.quant["Q8_0→Q8_0"]
    assert 0 < q8["requant_rel_error"] < 1e-2 and 0 < q8["base_rel_error_est"] < 1e-2 and q8["delta_rel"] > 0.5


def test_f32_merge_is_exact_and_metadata_is_copied(tiny: dict, tmp_path: Path) -> None:
    merge_model(tiny["gguf"], [read_adapter(tiny["adapter"])], tmp_path / "m.gguf", quant="f32")
    got = _tensors(tmp_path / "m.gguf")
    for name, exact in tiny["exact"].items():
        assert _rel(got[name], exact) < 2e-6, name
    a, b = gguf.GGUFReader(str(tiny["gguf"])), gguf.GGUFReader(str(tmp_path / "m.gguf"))
    fa = {k: f.contents() for k, f in a.fields.items() if not k.startswith("GGUF.")}
    fb = {k: f.contents() for k, f in b.fields.items() if not k.startswith("GGUF.")}
    assert "loratools.merge" in fb
    fb.pop("loratools.merge")
    assert fa == fb and list(fa) == list(fb)


def test_verify_and_unmerge(tiny: dict, tmp_path: Path) -> None:
    ad = read_adapter(tiny["adapter"])
    merge_model(tiny["gguf"], [ad], tmp_path / "m.gguf", quant="q8_0")
    v = verify_merge(tiny["gguf"], [ad], tmp_path / "m.gguf")
    assert v.ok and len(v.modules) == len(TYPES), v.to_json()
    half = verify_merge(tiny["gguf"], [(ad, 0.5)], tmp_path / "m.gguf")  # the wrong weight must fail
    assert not half.ok
    unmerge_model(tmp_path / "m.gguf", [ad], tmp_path / "u.gguf", quant="f32")
    back, base = _tensors(tmp_path / "u.gguf"), _tensors(tiny["gguf"])
    for name in tiny["exact"]:
        assert _rel(back[name], base[name]) < 2e-2, name  # one Q8_0 rounding of W0 + ΔW


def test_same_is_refused_where_the_type_cannot_be_written(tmp_path: Path, tiny: dict) -> None:
    weights = dict(tiny["weights"])
    a = weights["blk.0.attn_v.weight"][0]
    raw = np.zeros((a.shape[0], a.shape[1] // 32, 18), np.uint8)  # IQ4_NL: fp16 scale + 16 bytes of 4-bit codes
    raw[:, :, :2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    raw[:, :, 2:] = np.random.default_rng(0).integers(0, 256, raw[:, :, 2:].shape, dtype=np.uint8)
    w = gguf.GGUFWriter(str(tmp_path / "iq.gguf"), "llama")
    w.add_uint32("llama.attention.head_count", HEADS)
    w.add_uint32("llama.attention.head_count_kv", KV_HEADS)
    for name, (arr, t) in weights.items():
        if name == "blk.0.attn_v.weight":
            w.add_tensor(name, raw.reshape(a.shape[0], -1), raw_dtype=gguf.GGMLQuantizationType.IQ4_NL)
        elif t in ("F32", "F16"):
            w.add_tensor(name, arr.astype(np.float32 if t == "F32" else np.float16))
        else:
            w.add_tensor(name, quantize(arr, t), raw_dtype=gguf.GGMLQuantizationType[t])
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    ad = read_adapter(tiny["adapter"])
    with pytest.raises(InvalidOptionError, match=r"blk\.0\.attn_v\.weight \(IQ4_NL\).*q8_0"):
        merge_model(tmp_path / "iq.gguf", [ad], tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()
    merge_model(tmp_path / "iq.gguf", [ad], tmp_path / "m.gguf", quant="q8_0")
    assert {t.name: t.qtype for t in open_gguf_model(tmp_path / "m.gguf").all_tensors()}["blk.0.attn_v.weight"] == "Q8_0"


def test_adapter_the_model_cannot_take_is_refused_by_name(tiny: dict, tmp_path: Path) -> None:
    weights = {k: v for k, v in tiny["weights"].items() if k != "blk.1.ffn_up.weight"}
    _write_gguf(tmp_path / "less.gguf", weights)
    with pytest.raises(MissingModuleError, match=r"model\.layers\.1\.mlp\.up_proj \(blk\.1\.ffn_up\.weight\)"):
        merge_model(tmp_path / "less.gguf", [read_adapter(tiny["adapter"])], tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_split_model_is_written_in_the_same_split_layout(tiny: dict, tmp_path: Path) -> None:
    _write_gguf(tmp_path / "sp.gguf", tiny["weights"], split=6)
    first = tmp_path / "sp-00001-of-00003.gguf"
    assert first.exists()
    rep = merge_model(first, [read_adapter(tiny["adapter"])], tmp_path / "out.gguf", quant="f32")
    assert [p.name for p in rep.files] == [f"out-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    src, out = open_gguf_model(first), open_gguf_model(rep.files[0])
    assert [[t.name for t in ts] for ts in src.tensors] == [[t.name for t in ts] for ts in out.tensors]
    got = {}
    for p in rep.files:
        got.update(_tensors(p))
    for name, exact in tiny["exact"].items():
        assert _rel(got[name], exact) < 2e-6, name


def test_cli_merge_gguf(tiny: dict, tmp_path: Path, cli) -> None:
    r = cli("merge", tiny["gguf"], tiny["adapter"], "-o", tmp_path / "m.gguf", "--verify")
    assert r.returncode == 0, r.stderr
    assert "Q4_K→Q4_K" in r.stdout and "requantization error" in r.stdout
    r = cli("merge", tiny["gguf"], tiny["adapter"], "-o", tmp_path / "x.gguf", "--dtype", "bfloat16")
    assert r.returncode == 2 and "--quant" in r.stderr and not (tmp_path / "x.gguf").exists()


def test_threads_do_not_change_a_byte(tiny: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib

    import loratools.merge.gguf_stream as stream

    monkeypatch.setattr(stream, "BLOCK_VALUES", 4096)  # many blocks per tensor, so threads interleave
    shas = []
    for cores in (1, 4):
        monkeypatch.setattr(stream, "cpu_cores", lambda cores=cores: cores)
        merge_model(tiny["gguf"], [read_adapter(tiny["adapter"])], tmp_path / f"m{cores}.gguf")
        shas.append(hashlib.sha256((tmp_path / f"m{cores}.gguf").read_bytes()).hexdigest())
    assert shas[0] == shas[1]


# --- how much of ΔW the written model keeps (requantizing to 4 bits can round a small ΔW away) -----------------

def _gguf_deq(path: Path) -> dict[str, np.ndarray]:
    """Every tensor dequantized by llama.cpp's own Python package (gguf.quants.dequantize), as float64."""
    from gguf.quants import dequantize as gguf_dequantize

    r = gguf.GGUFReader(str(path))
    return {t.name: gguf_dequantize(t.data, t.tensor_type).astype(np.float64)
            .reshape(tuple(int(x) for x in reversed(t.shape.tolist()))) for t in r.tensors}


@pytest.fixture(scope="module")
def q4(tiny: dict) -> dict:
    """The tiny model with every adapted tensor Q4_0 or Q4_1, and ΔW of the adapter (weight 1) per tensor:
    peft's merge minus the base it merged into, in float64 (independent of loratools)."""
    base = _gguf_deq(tiny["gguf"])
    delta = {n: e - base[n] for n, e in tiny["exact"].items()}
    weights = {n: (a, ("Q4_0", "Q4_1")[i % 2] if n in tiny["exact"] else t)
               for i, (n, (a, t)) in enumerate(tiny["weights"].items())}
    _write_gguf(tiny["dir"] / "q4.gguf", weights)
    return {"gguf": tiny["dir"] / "q4.gguf", "delta": delta}


def _kept(base: Path, merged: Path, delta: dict[str, np.ndarray], w: float) -> tuple[float, float]:
    """(‖realized − w·ΔW‖F/‖w·ΔW‖F, ⟨realized, w·ΔW⟩/‖w·ΔW‖F²) over every adapted tensor, in float64."""
    b, m = _gguf_deq(base), _gguf_deq(merged)
    e2 = dot = d2 = 0.0
    for n, d in delta.items():
        realized, want = m[n] - b[n], w * d
        e2 += float(((realized - want) ** 2).sum())
        dot += float((realized * want).sum())
        d2 += float((want * want).sum())
    return float(np.sqrt(e2 / d2)), dot / d2


SMALL = 0.005  # the adapter's weight: ΔW ≈ 1 % of W0, below the 4-bit step (realistic for a trained LoRA)


def test_q4_same_merge_that_rounds_a_small_update_away_is_refused(tiny: dict, q4: dict, tmp_path: Path,
                                                                  cli) -> None:
    out, rec = tmp_path / "m.gguf", tmp_path / "r.safetensors"
    r = cli("merge", q4["gguf"], tiny["adapter"], "--weight", SMALL, "-o", out, "--record", rec, "--verify")
    assert r.returncode == 2, r.stdout
    line = r.stderr.strip()
    assert len(line.splitlines()) == 1 and not out.exists() and not rec.exists() and not list(tmp_path.iterdir())
    r = cli("merge", q4["gguf"], tiny["adapter"], "--weight", SMALL, "-o", out, "--allow-lossy", "--json")
    assert r.returncode == 0, r.stderr
    rel, kept = _kept(q4["gguf"], out, q4["delta"], SMALL)  # llama.cpp's dequantizer, float64
    assert kept < 0.1 and rel > 1.0  # the merge keeps a few % of ΔW: right to refuse it
    assert f"keeps {100 * kept:.3g}% of the adapters' update" in line, line
    assert "--quant q8_0 or f16" in line and "--allow-lossy" in line and "nothing was written" in line
    u = json.loads(r.stdout)["update"]
    assert u["lossy"] and json.loads(r.stdout)["allowed_lossy"]
    assert u["kept"] == pytest.approx(kept, rel=1e-6) and u["rel_error"] == pytest.approx(rel, rel=1e-6)
    # verify reports the same figure and fails on it, unless the same flag
    v = cli("verify", q4["gguf"], tiny["adapter"], out, "--weight", SMALL)
    assert v.returncode == 2 and f"keeps {100 * kept:.3g}%" in v.stderr and "--allow-lossy" in v.stderr, v.stderr
    v = cli("verify", q4["gguf"], tiny["adapter"], out, "--weight", SMALL, "--allow-lossy")
    assert v.returncode == 0 and f"keeps {100 * kept:.3g}%" in v.stdout, v.stderr


@pytest.mark.parametrize("quant", ["q8_0", "f16"])
def test_q4_merge_to_a_finer_type_keeps_the_small_update(tiny: dict, q4: dict, tmp_path: Path, cli,
                                                         quant: str) -> None:
    out = tmp_path / "m.gguf"
    r = cli("merge", q4["gguf"], tiny["adapter"], "--weight", SMALL, "-o", out, "--quant", quant, "--verify", "--json")
    assert r.returncode == 0, r.stderr
    rel, kept = _kept(q4["gguf"], out, q4["delta"], SMALL)
    assert kept == pytest.approx(1, abs=0.01)
    rep = json.loads(r.stdout)
    assert rep["update"]["kept"] == pytest.approx(kept, rel=1e-6) and not rep["allowed_lossy"]
    assert rep["update"]["rel_error"] == pytest.approx(rel, rel=1e-6)
    assert rep["verify"]["update"]["kept"] == pytest.approx(kept, rel=1e-6)
    for q in rep["quant"].values():
        assert q["update_kept"] == pytest.approx(1, abs=0.02)
    r = cli("merge", q4["gguf"], tiny["adapter"], "--weight", SMALL, "-o", tmp_path / "t.gguf", "--quant", quant)
    assert r.returncode == 0 and f"update: the written model keeps {100 * rep['update']['kept']:.3g}%" in r.stdout, \
        r.stdout


def test_q4_same_merge_of_a_large_update_passes(tiny: dict, q4: dict, tmp_path: Path) -> None:
    ad = read_adapter(tiny["adapter"])
    rep = merge_model(q4["gguf"], [ad], tmp_path / "m.gguf", verify=True)
    rel, kept = _kept(q4["gguf"], tmp_path / "m.gguf", q4["delta"], 1.0)
    assert rep.update is not None and not rep.update.lossy and not rep.allowed_lossy
    assert rep.update.kept == pytest.approx(kept, rel=1e-6) and kept > 0.95
    assert rep.update.rel_error == pytest.approx(rel, rel=1e-6) and rel < 0.2
    assert rep.verify is not None and rep.verify.ok


def test_lossy_refusal_in_python_leaves_nothing_and_names_the_figure(tiny: dict, q4: dict, tmp_path: Path) -> None:
    from loratools.errors import LossyMergeError

    ad = read_adapter(tiny["adapter"])
    _write_gguf(tmp_path / "sp.gguf", {n: (a, "Q4_1" if n in tiny["exact"] else t)
                                       for n, (a, t) in tiny["weights"].items()}, split=6)
    with pytest.raises(LossyMergeError) as e:  # a split model: refused before any part is renamed into place
        merge_model(tmp_path / "sp-00001-of-00003.gguf", [(ad, SMALL)], tmp_path / "out.gguf")
    assert e.value.kept < 0.1 and "`quant` q8_0 or f16" in str(e.value)
    assert not list(tmp_path.glob("out*"))
