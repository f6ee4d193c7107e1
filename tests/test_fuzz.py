"""Seeded fuzzing of every reader through its public entry point: success or a LoraToolsError, nothing else.

Each reader gets N mutations of a valid input (byte flips, truncations, lying
lengths and offsets, each JSON value replaced by every other JSON type, deep
nesting, huge numbers). The seed is fixed, so a failure reproduces; the counts
and the time per reader are printed with ``-s`` and recorded in docs/reliability.md.
"""

from __future__ import annotations

import json
import random
import shutil
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from loratools.errors import LoraToolsError

ROOT = Path(__file__).resolve().parent.parent
ADAPTERS = ROOT / "fixtures" / "adapters"
TINY = ROOT / "fixtures" / "tiny-llama"
N = 150  # mutations per reader; a few seconds each on 2 shared cores

_OTHER_TYPES = [None, True, 0, -1, 2**70, 1e308, "x", "", [], [1, "a"], {}, {"k": None}]


# -------------------------------------------------------------------------- mutators

def _split(data: bytes) -> tuple[int, bytes, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return n, data[8:8 + n], data[8 + n:]


def _pack(header: bytes, rest: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header + rest


def _json_paths(obj, path=()) -> Iterator[tuple]:
    yield path
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _json_paths(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _json_paths(v, path + (i,))


def _replace(obj, path, value):
    if not path:
        return value
    obj = json.loads(json.dumps(obj))
    cur = obj
    for p in path[:-1]:
        cur = cur[p]
    cur[path[-1]] = value
    return obj


def mutate_json(text: str, rng: random.Random) -> str:
    """One JSON mutation: a value replaced by another type, deep nesting, a huge number, or raw damage."""
    obj = json.loads(text)
    kind = rng.randrange(6)
    if kind == 0:
        paths = list(_json_paths(obj))
        return json.dumps(_replace(obj, rng.choice(paths), rng.choice(_OTHER_TYPES)))
    if kind == 1:
        depth = rng.choice([100, 5000, 200_000])
        paths = list(_json_paths(obj))
        return json.dumps(_replace(obj, rng.choice(paths), None)).replace("null", "[" * depth + "]" * depth, 1)
    if kind == 2:
        paths = list(_json_paths(obj))
        return json.dumps(_replace(obj, rng.choice(paths), None)).replace("null", "9" * rng.choice([30, 5000]), 1)
    if kind == 3:
        return text[: rng.randrange(len(text) + 1)]
    if kind == 4:
        b = bytearray(text.encode())
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return b.decode("utf-8", "replace")
    paths = [p for p in _json_paths(obj) if p] or [()]
    return json.dumps(_replace(obj, rng.choice(paths), float(rng.choice(["nan", "inf", "-inf"]))))


def mutate_safetensors(data: bytes, rng: random.Random) -> bytes:
    """One safetensors mutation: byte flips, truncation, a lying header length, lying offsets/shapes, bad JSON."""
    n, head, rest = _split(data)
    kind = rng.randrange(6)
    if kind == 0:
        b = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        return bytes(b)
    if kind == 1:
        return data[: rng.randrange(len(data))]
    if kind == 2:
        return struct.pack("<Q", rng.choice([0, n - 1, n + 1, len(data), 2**63, 2**64 - 1])) + data[8:]
    if kind == 3:
        h = json.loads(head)
        name = rng.choice([k for k in h if k != "__metadata__"])
        field = rng.choice(["data_offsets", "shape"])
        v = list(h[name][field])
        if v:
            v[rng.randrange(len(v))] = rng.choice([-1, 0, 2**40, 2**64, 3, v[0] + 1])
        h[name][field] = v
        return _pack(json.dumps(h).encode(), rest)
    if kind == 4:
        return _pack(mutate_json(head.decode(), rng).encode("utf-8", "surrogatepass"), rest)
    h = json.loads(head)
    meta = h.get("__metadata__") or {}
    if meta:
        key = rng.choice(sorted(meta))
        try:
            meta[key] = mutate_json(meta[key], rng)
        except ValueError:  # a plain string, not JSON
            meta[key] = rng.choice(["", "x" * 10000, "[" * 5000])
        h["__metadata__"] = meta
    return _pack(json.dumps(h).encode(), rest)


# -------------------------------------------------------------------------- harness

def _fuzz(name: str, rounds: int, case: Callable[[random.Random, int], None]) -> dict[str, int]:
    rng = random.Random(f"loratools-fuzz-{name}")
    counts = {"ok": 0, "refused": 0}
    t0 = time.perf_counter()
    for i in range(rounds):
        try:
            case(rng, i)
            counts["ok"] += 1
        except LoraToolsError as e:
            assert "\n" not in str(e), (name, i, str(e))
            counts["refused"] += 1
        # anything else propagates: a bug, with the seed and round in the report
    print(f"\nfuzz {name}: {rounds} mutations, {counts['ok']} read, {counts['refused']} refused, "
          f"{time.perf_counter() - t0:.1f}s")
    return counts


def _read_adapter(path: Path) -> None:
    from loratools.formats import read_adapter

    read_adapter(path)


def test_fuzz_peft_dir(tmp_path):
    d = tmp_path / "a"

    def case(rng, i):
        shutil.rmtree(d, ignore_errors=True)
        src = ADAPTERS / rng.choice(["lora", "adalora", "rslora"])
        shutil.copytree(src, d)
        if rng.random() < 0.5:
            cfg = d / "adapter_config.json"
            cfg.write_text(mutate_json(cfg.read_text(), rng), errors="surrogatepass")
        else:
            w = d / "adapter_model.safetensors"
            w.write_bytes(mutate_safetensors(w.read_bytes(), rng))
        _read_adapter(d)

    _fuzz("peft-dir", N, case)


def test_fuzz_single_file(tmp_path):
    data = (ADAPTERS / "lora.safetensors").read_bytes()

    def case(rng, i):
        f = tmp_path / "s.safetensors"
        f.write_bytes(mutate_safetensors(data, rng))
        _read_adapter(f)

    _fuzz("single-file", N, case)


def _kohya_bytes(tmp: Path) -> bytes:
    from loratools.formats import read_adapter, write_adapter

    write_adapter(read_adapter(ADAPTERS / "lora"), tmp / "k.safetensors", format="kohya")
    return (tmp / "k.safetensors").read_bytes()


def test_fuzz_kohya(tmp_path):
    data = _kohya_bytes(tmp_path)

    def case(rng, i):
        f = tmp_path / "m.safetensors"
        f.write_bytes(mutate_safetensors(data, rng))
        _read_adapter(f)

    _fuzz("kohya", N, case)


def test_fuzz_gguf(tmp_path):
    pytest.importorskip("gguf")
    from loratools.formats import read_adapter, write_adapter

    write_adapter(read_adapter(ADAPTERS / "lora"), tmp_path / "a.gguf", format="gguf")
    data = (tmp_path / "a.gguf").read_bytes()

    def case(rng, i):
        b = bytearray(data)
        kind = rng.randrange(3)
        if kind == 0:
            for _ in range(rng.randint(1, 8)):
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        elif kind == 1:
            b = b[: rng.randrange(len(b))]
        else:  # a lying 64-bit count or length somewhere in the first KiB (the KV section)
            at = rng.randrange(8, min(1024, len(b) - 8))
            b[at:at + 8] = struct.pack("<Q", rng.choice([0, 2**31, 2**63, 2**64 - 1]))
        f = tmp_path / "m.gguf"
        f.write_bytes(bytes(b))
        _read_adapter(f)

    _fuzz("gguf", N, case)


def test_fuzz_base_model(tmp_path):
    from loratools.io import ModelReader

    data = (TINY / "model.safetensors").read_bytes()

    def case(rng, i):
        d = tmp_path / "m"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
        if rng.random() < 0.5:
            (d / "model.safetensors").write_bytes(mutate_safetensors(data, rng))
        else:
            (d / "model.safetensors").write_bytes(data)
            keys = list(json.loads(_split(data)[1]))
            index = {"metadata": {"total_size": 1}, "weight_map": {k: "model.safetensors" for k in keys
                                                                   if k != "__metadata__"}}
            (d / "model.safetensors.index.json").write_text(mutate_json(json.dumps(index), rng),
                                                            errors="surrogatepass")
        with ModelReader(d) as m:
            for k in m.keys():
                m.get(k)

    _fuzz("base-model", N, case)


def test_fuzz_merge_record(tmp_path):
    from loratools.formats import read_adapter
    from loratools.merge.plan import AdapterInput
    from loratools.merge.record import read_record
    from loratools.merge.jobs import merge_model

    rec = tmp_path / "r.safetensors"
    merge_model(TINY, [read_adapter(ADAPTERS / "lora")], tmp_path / "merged", record=rec)
    data = rec.read_bytes()
    inputs = [AdapterInput(read_adapter(ADAPTERS / "lora"))]

    def case(rng, i):
        f = tmp_path / "m.safetensors"
        f.write_bytes(mutate_safetensors(data, rng))
        read_record(f, inputs)

    _fuzz("merge-record", N, case)


def test_fuzz_merge_stamp(tmp_path):
    from loratools.merge.plan import stamp_entries
    from loratools.merge.jobs import merge_model
    from loratools.formats import read_adapter
    from loratools.io import ModelReader

    merge_model(TINY, [read_adapter(ADAPTERS / "lora")], tmp_path / "merged")
    text = ModelReader(tmp_path / "merged").metadata()["loratools.merge"]

    def case(rng, i):
        stamp_entries(mutate_json(text, rng), where="stamp")

    _fuzz("merge-stamp", N * 2, case)


def test_fuzz_checkpoint_state(tmp_path):
    from loratools.train.checkpoint import FORMAT, read_state
    from loratools.train.config import TrainConfig, config_of_state

    state = {"step": 2, "config": TrainConfig(steps=4).to_json(), "world_size": 1, "losses": [{"step": 1, "loss": 3.0}],
             "evals": [], "rng": [[1, 2, 3]], "format": FORMAT}
    text = json.dumps(state)

    def case(rng, i):
        (tmp_path / "state.json").write_text(mutate_json(text, rng), errors="surrogatepass")
        config_of_state(read_state(tmp_path), tmp_path / "state.json")

    _fuzz("checkpoint-state", N * 2, case)


# -------------------------------------------------------------------------- through the CLI: exit 0 or 2, one line

def _cli_case(args: list, outs: list[Path]) -> int:
    """Run ``loratools ARGS`` in-process: exit 0, or 2 with exactly one stderr line and none of ``outs`` written."""
    from conftest import run_cli

    res = run_cli(*args)  # an exception main lets through (a bug) propagates with the round in the report
    assert res.returncode in (0, 2), (args, res.returncode, res.stderr[-2000:])
    if res.returncode == 2:
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
        assert not any(o.exists() for o in outs), (args, res.stderr)
    return res.returncode


def _counted(name: str, rounds: int, case: Callable[[random.Random, int], int]) -> None:
    rng = random.Random(f"loratools-fuzz-{name}")
    codes = {0: 0, 2: 0}
    t0 = time.perf_counter()
    for i in range(rounds):
        codes[case(rng, i)] += 1
    print(f"\nfuzz {name}: {rounds} mutations, {codes[0]} exit 0, {codes[2]} exit 2, {time.perf_counter() - t0:.1f}s")


def test_fuzz_unmerge_with_a_record(tmp_path):
    """A merge record's bytes mutated (and each patch part's values), then ``unmerge --record``."""
    from loratools.formats import read_adapter
    from loratools.io import load_safetensors, save_safetensors
    from loratools.merge.jobs import merge_model

    rec = tmp_path / "r.safetensors"
    merge_model(TINY, [read_adapter(ADAPTERS / "lora")], tmp_path / "merged", record=rec)
    data = rec.read_bytes()
    parts, meta = load_safetensors(rec)
    import torch

    def case(rng, i):
        f, out = tmp_path / "m.safetensors", tmp_path / f"u{i}"
        if rng.random() < 0.5:
            f.write_bytes(mutate_safetensors(data, rng))
        else:  # a valid file whose parts lie: values, lengths, dtypes
            t = dict(parts)
            k = rng.choice(sorted(t))
            v = t[k]
            kind = rng.randrange(4)
            if kind == 0:
                t[k] = v.flatten()[: rng.randrange(v.numel() + 1)].clone()
            elif kind == 1:
                t[k] = torch.full_like(v, rng.choice([-1, 0, 1, 2, 8, 16, 2**31 - 1]))
            elif kind == 2:
                t[k] = v.to(rng.choice([torch.int8, torch.int32, torch.float16, torch.float64, torch.uint8]))
            else:
                del t[k]
            save_safetensors(t, f, meta)
        code = _cli_case(["unmerge", tmp_path / "merged", ADAPTERS / "lora", "-o", out, "--record", f], [out])
        shutil.rmtree(out, ignore_errors=True)
        return code

    _counted("unmerge-record", N // 3, case)


def test_fuzz_verify_with_a_base_config(tmp_path):
    """The base's config.json mutated, then ``merge --verify``."""
    base, cfg = tmp_path / "base", (TINY / "config.json").read_text()
    shutil.copytree(TINY, base)

    def case(rng, i):
        (base / "config.json").write_text(mutate_json(cfg, rng), errors="surrogatepass")
        out = tmp_path / f"m{i}"
        code = _cli_case(["merge", base, ADAPTERS / "lora", "-o", out, "--verify"], [out])
        shutil.rmtree(out, ignore_errors=True)
        return code

    _counted("base-config", N // 5, case)


def test_fuzz_gguf_adapter_header_through_the_cli(tmp_path):
    """A GGUF adapter's header (its KV section) damaged, then ``inspect`` and ``convert``."""
    pytest.importorskip("gguf")
    from conftest import run_cli

    assert run_cli("convert", ADAPTERS / "lora", "-o", tmp_path / "a.gguf", "--to", "gguf", "--base", TINY).returncode == 0
    data = (tmp_path / "a.gguf").read_bytes()

    def case(rng, i):
        b = bytearray(data)
        at = rng.randrange(8, min(2048, len(b) - 8))
        if rng.random() < 0.5:
            b[at:at + 8] = struct.pack("<Q", rng.choice([0, 1, 3, 2**31, 2**63, 2**64 - 1]))
        else:
            b[at] ^= 1 << rng.randrange(8)
        f, out = tmp_path / "m.gguf", tmp_path / f"c{i}"
        f.write_bytes(bytes(b))
        code = _cli_case(["convert", f, "-o", out, "--to", "peft"], [out])
        shutil.rmtree(out, ignore_errors=True)
        return code

    _counted("gguf-adapter-header", N // 3, case)


def test_fuzz_gguf_model_header(tmp_path):
    """A GGUF model's header damaged, then ``merge`` into it (a tiny F32 llama written from tiny-llama)."""
    gguf = pytest.importorskip("gguf")
    import re

    import numpy as np

    from loratools.io import load_safetensors

    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    tensors, _ = load_safetensors(TINY / "model.safetensors")
    cfg = json.loads((TINY / "config.json").read_text())
    w = gguf.GGUFWriter(str(tmp_path / "b.gguf"), "llama")
    w.add_uint32("llama.attention.head_count", cfg["num_attention_heads"])
    w.add_uint32("llama.attention.head_count_kv", cfg["num_key_value_heads"])
    w.add_uint32("llama.block_count", cfg["num_hidden_layers"])
    for k, t in tensors.items():
        m = re.fullmatch(r"model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.weight", k)
        if m:
            w.add_tensor(f"blk.{m[1]}.{names[m[2]]}.weight", t.float().numpy().astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    data = (tmp_path / "b.gguf").read_bytes()

    def case(rng, i):
        b = bytearray(data)
        kind = rng.randrange(3)
        at = rng.randrange(8, min(2048, len(b) - 8))
        if kind == 0:
            b[at:at + 8] = struct.pack("<Q", rng.choice([0, 1, 3, 2**31, 2**63, 2**64 - 1]))
        elif kind == 1:
            b[at] ^= 1 << rng.randrange(8)
        else:
            b = b[: rng.randrange(len(b))]
        f, out = tmp_path / "m.gguf", tmp_path / f"o{i}.gguf"
        f.write_bytes(bytes(b))
        code = _cli_case(["merge", f, ADAPTERS / "lora", "-o", out], [out])
        out.unlink(missing_ok=True)
        return code

    _counted("gguf-model-header", N // 3, case)
