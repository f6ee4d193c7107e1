"""Seeded fuzzing of every reader through its public entry point: success or a LoraToolsError, nothing else.

Each reader gets N mutations of a valid input (byte flips, truncations, lying
lengths and offsets, each JSON value replaced by every other JSON type, deep
nesting, huge numbers); through the CLI, ``train --resume`` from a real checkpoint damaged and
``pull`` from a fake Hub whose replies are damaged (exit 0, or 2 with one line). The seed is fixed, so a failure reproduces; the counts
and the time per reader are printed with ``-s`` and recorded in docs/reliability.md.
"""

from __future__ import annotations

import json
import os
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
CORPUS = ROOT / "fixtures" / "corpus.txt"
#: a 3-step run of seconds; the options that set a run's cost are typed again at every resume below, so a
#: mutated checkpoint cannot make one long (its own values are still read and checked, then must agree)
TRAIN_FAST = ["--steps", "3", "--rank", "2", "--alpha", "4", "--lr", "2e-3", "--seq-len", "16", "--batch-size", "2",
              "--grad-accum", "1", "--device", "cpu", "--eval-split", "0.03", "--eval-every", "2"]
#: LORATOOLS_FUZZ_SCALE=k runs k times the mutations of the resume and pull fuzzes (a longer hunt, same seeds)
SCALE = int(os.environ.get("LORATOOLS_FUZZ_SCALE", "1"))
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


#: what a checkpoint's fields are replaced by: each other type, huge, negative, non-finite, long strings
_ODD_VALUES = [*_OTHER_TYPES, -1, -2**63, 2**31, 2**64, 10**30, float("nan"), float("inf"), float("-inf"), 0.5,
               "x" * 100_000, "../x", "\x00", [[]], {"": {}}]


def _random_path(obj, rng: random.Random) -> tuple:
    """A path into ``obj``, descending one random child at a time (so a 5 000-byte list is one choice, not 5 000)."""
    path: tuple = ()
    while isinstance(obj, (dict, list)) and obj and (not path or rng.random() < 0.7):
        key = rng.choice(sorted(obj)) if isinstance(obj, dict) else rng.randrange(len(obj))
        path, obj = path + (key,), obj[key]
    return path


def mutate_state(state: dict, rng: random.Random) -> object:
    """One field of a checkpoint's state.json replaced by an odd value, or a key dropped."""
    path = _random_path(state, rng) or ("step",)
    if rng.random() < 0.25:
        obj = json.loads(json.dumps(state))
        parent = obj
        for p in path[:-1]:
            parent = parent[p]
        if isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent.pop(path[-1])
        return obj
    return _replace(state, path, rng.choice(_ODD_VALUES))


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


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A real checkpoint: ``loratools train`` for 3 steps on tiny-llama, saving step 2 (once per module);
    resuming from it gives the uninterrupted run's adapter, bit for bit."""
    from conftest import run_cli

    root = tmp_path_factory.mktemp("ckpt")
    full = run_cli("-q", "train", TINY, CORPUS, "-o", root / "full", *TRAIN_FAST, "--save-every", "2")
    assert full.returncode == 0, full.stderr
    ckpt = root / "full.checkpoints" / "step-2"
    res = run_cli("-q", "train", TINY, CORPUS, "-o", root / "resumed", "--resume", ckpt)
    assert res.returncode == 0, res.stderr
    for name in ("adapter_model.safetensors", "loss_curve.json"):
        assert (root / "full" / name).read_bytes() == (root / "resumed" / name).read_bytes(), name
    return {"ckpt": ckpt, "root": root}


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


def test_fuzz_checkpoint_state(tmp_path, checkpoint):
    """A real checkpoint's state.json (see :func:`checkpoint`) mutated, then read as ``--resume`` reads it."""
    from loratools.train.checkpoint import read_state
    from loratools.train.config import config_of_state

    text = (checkpoint["ckpt"] / "state.json").read_text()
    read_state(checkpoint["ckpt"])  # the base is valid: every refusal below is the mutation's

    def case(rng, i):
        (tmp_path / "state.json").write_text(mutate_json(text, rng) if rng.random() < 0.5
                                             else json.dumps(mutate_state(json.loads(text), rng)),
                                             errors="surrogatepass")
        config_of_state(read_state(tmp_path), tmp_path / "state.json")

    _fuzz("checkpoint-state", N * 2, case)


# -------------------------------------------------------------------------- through the CLI: exit 0 or 2, one line

def _cli_case(args: list, outs: list[Path], **kw) -> int:
    """Run ``loratools ARGS`` in-process: exit 0, or 2 with exactly one stderr line and none of ``outs`` written."""
    from conftest import run_cli

    res = run_cli(*args, **kw)  # an exception main lets through (a bug) propagates with the round in the report
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


def test_fuzz_resume_from_a_checkpoint(tmp_path, checkpoint):
    """``train --resume`` from a real checkpoint whose state.json (a field of the wrong type, huge, negative, NaN,
    dropped) or tensors (file truncated, emptied, bytes flipped, lying header, a tensor of another shape or dtype,
    missing, extra, non-finite) were damaged: a valid resume, or one line and no OUT, no checkpoint written."""
    import torch

    from loratools.io import load_safetensors, save_safetensors

    src = checkpoint["ckpt"]
    state = json.loads((src / "state.json").read_text())
    files = {n: (src / n).read_bytes() for n in ("trainable.safetensors", "optimizer.safetensors")}
    dtypes = [torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.uint8, torch.bool]

    def damage_tensors(f: Path, rng: random.Random) -> None:
        t, meta = load_safetensors(f)
        k = rng.choice(sorted(t))
        v = t[k]
        kind = rng.randrange(6)
        if kind == 0:  # another shape: flattened, cut, grown, or one more dimension
            t[k] = rng.choice([v.flatten(), v.flatten()[: max(0, v.numel() - 1)], torch.zeros(v.numel() + 1),
                               v.unsqueeze(0), torch.zeros(())]).contiguous()
        elif kind == 1:
            t[k] = v.to(rng.choice(dtypes))
        elif kind == 2:
            del t[k]
        elif kind == 3:
            t[k + rng.choice(["", ".x", "::exp_avg"]) + "_extra"] = v.clone()
        elif kind == 4:
            t[k] = torch.full_like(v, rng.choice([float("nan"), float("inf"), -1.0, 3.0, 1e30]))
        else:
            t = {}
        save_safetensors(t, f, meta)

    def case(rng, i):
        d, out, ck = tmp_path / f"c{i}", tmp_path / f"o{i}", tmp_path / f"k{i}"
        shutil.copytree(src, d)
        what = rng.randrange(3)
        if what == 0:
            text = json.dumps(mutate_state(state, rng)) if rng.random() < 0.8 else mutate_json(json.dumps(state), rng)
            (d / "state.json").write_text(text, errors="surrogatepass")
        else:
            f = d / rng.choice(sorted(files))
            kind = rng.randrange(5)
            if kind == 0:
                f.write_bytes(mutate_safetensors(files[f.name], rng))
            elif kind == 1:
                f.write_bytes(files[f.name][: rng.randrange(len(files[f.name]))])
            elif kind == 2:
                f.write_bytes(b"")
            elif kind == 3:
                f.unlink()
            else:
                damage_tensors(f, rng)
        code = _cli_case(["-q", "train", TINY, CORPUS, "-o", out, "--resume", d, "--checkpoint-dir", ck, *TRAIN_FAST],
                         [out, ck])
        shutil.rmtree(d)
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(ck, ignore_errors=True)
        return code

    _counted("resume", 40 * SCALE, case)


def test_a_checkpoint_without_world_size_resumes_as_one_process(tmp_path, checkpoint):
    """Found by the resume fuzz: read_state took a missing ``world_size`` as 1 but left it missing, so resuming
    raised KeyError; the reader now fills the default in, and the resume is the uninterrupted run's."""
    from conftest import run_cli

    from loratools.train.checkpoint import read_state

    d = tmp_path / "c"
    shutil.copytree(checkpoint["ckpt"], d)
    state = json.loads((d / "state.json").read_text())
    del state["world_size"]
    (d / "state.json").write_text(json.dumps(state))
    assert read_state(d)["world_size"] == 1
    res = run_cli("-q", "train", TINY, CORPUS, "-o", tmp_path / "out", "--resume", d, *TRAIN_FAST)
    assert res.returncode == 0, res.stderr
    name = "adapter_model.safetensors"
    assert (tmp_path / "out" / name).read_bytes() == (checkpoint["root"] / "full" / name).read_bytes()


# -------------------------------------------------------------------------- hostile Hub replies to `pull`

#: header values a hostile endpoint may send where a commit id, an ETag, a size or a Location goes
_HOSTILE_VALUES = [b"../" * k + b"planted" for k in range(1, 7)] + [
    b"/tmp/planted", b"..", b".", b"", b"%2e%2e%2fplanted", b"%2E%2E/%2E%2E/planted", b"a\x00b" * 10, b"\x00",
    b"x" * 70_000, b"0" * 40 + b"/..", b"A" * 40, b"0" * 41, b"W/\"../../x\"", b"\"\"", b"\"" + b"f" * 64 + b"\"",
    b"-1", b"18446744073709551616", b"1e3", b"\xff\xfe\xc3", "é".encode()]


def _odd_header(rng: random.Random) -> bytes:
    if rng.random() < 0.8:
        return rng.choice(_HOSTILE_VALUES)
    return bytes(rng.randrange(256) for _ in range(rng.randint(1, 200))).replace(b"\r", b"").replace(b"\n", b"")


def _mangler(rng: random.Random, hub_url: str, other_url: str):
    """A ``FakeHub.mangle`` that damages the replies of one route (the first, or every one): their JSON, their
    commit id / ETag / size headers, their Content-Length or body length, their status, or a redirect elsewhere."""
    route = rng.choice([("info", "GET"), ("tree", "GET"), ("resolve", "HEAD"), ("resolve", "GET")])
    every = rng.random() < 0.5
    kind = rng.choice(["json", "json", "header", "header", "length", "status", "redirect"]
                      if route[0] != "resolve" else ["header", "header", "header", "length", "length", "status",
                                                    "redirect"])
    seen = [0]

    def mangle(name, method, status, headers, body):
        if (name, method) != route or (seen[0] and not every):
            return None
        seen[0] += 1
        h = [(k.encode(), str(v).encode("latin-1")) for k, v in headers.items()]
        if kind == "json" and status == 200:
            obj = json.loads(body)
            if isinstance(obj, dict) and "sha" in obj and rng.random() < 0.4:
                obj["sha"] = _odd_header(rng).decode("latin-1")
            else:
                obj = mutate_state(obj, rng) if obj else rng.choice(_ODD_VALUES)
            body = json.dumps(obj).encode()
            h = [(k, str(len(body)).encode() if k == b"Content-Length" else v) for k, v in h]
        elif kind == "header":
            names = [b"X-Repo-Commit", b"ETag", b"X-Linked-Etag", b"X-Linked-Size", b"Content-Type"]
            for _ in range(rng.randint(1, 3)):
                key = rng.choice(names)
                h = [(k, v) for k, v in h if k != key] + [(key, _odd_header(rng))]
        elif kind == "length":
            n = len(body)
            lie = rng.choice([b"0", str(n - 1).encode(), str(n + 1).encode(), str(2 * n + 7).encode(), b"-1",
                              b"abc", str(2**63).encode(), b"1, 2"])
            cut = rng.choice([body, body[: n // 2], body[: max(0, n - 1)], b""])
            h = [(k, lie if k == b"Content-Length" else v) for k, v in h]
            if rng.random() < 0.3:
                h = [(k, v) for k, v in h if k != b"Content-Length"]  # no length: the body ends at the close
            body = cut
        elif kind == "status":
            status = rng.choice([200, 204, 206, 304, 400, 401, 403, 404, 410, 416, 418])
            if rng.random() < 0.5:
                body = rng.choice([b"<html>not json</html>", b"", b"{", json.dumps({"error": "x" * 5000}).encode()])
                h = [(k, str(len(body)).encode() if k == b"Content-Length" else v) for k, v in h]
        else:  # a redirect: to another host or port, to this one, in a loop, relative, or to nowhere
            where = rng.choice([other_url + "/tester/a/resolve/main/adapter_config.json", other_url + "/x",
                                hub_url.replace("127.0.0.1", "localhost") + "/api/models/tester/a",
                                hub_url.replace("127.0.0.1", "127.0.0.2") + "/x", "../../../../planted",
                                "/tester/a/resolve/main/adapter_model.safetensors", "//127.0.0.1:1/x", "",
                                "file:///etc/passwd", "http://[::1]:1/x"])
            status = rng.choice([301, 302, 303, 307, 308])
            h = [(k, v) for k, v in h if k != b"Content-Length"] + [(b"Location", where.encode()),
                                                                   (b"Content-Length", b"0")]
            body = b""
        return status, h, body

    return mangle


def _tree(root: Path) -> set[str]:
    """Every path under ``root`` (links not followed), relative to it."""
    out = set()
    for d, dirs, files in os.walk(root):
        for n in dirs + files:
            out.add(os.path.relpath(os.path.join(d, n), root))
    return out


def test_fuzz_pull_from_a_hostile_hub(tmp_path, monkeypatch):
    """``loratools pull`` (in-process) against tests/hub_server.py whose replies are damaged (:func:`_mangler`):
    exit 0 with the adapter's own bytes, or 2 with one line; nothing written outside the cache and OUT; each pull
    within its time bound (``LORATOOLS_HUB_TIMEOUT``, 2 s here)."""
    from huggingface_hub import constants

    from hub_server import FakeHub
    from test_hub import TOKEN, seed

    import loratools.hub.client as hub_client

    timeout = 2.0
    monkeypatch.setattr(hub_client, "_TIMEOUT_ENV", str(timeout))
    work = tmp_path / "w"
    (work / "cwd").mkdir(parents=True)
    env = {"HF_TOKEN": TOKEN, "PATH": os.environ.get("PATH", ""), "HF_HUB_DISABLE_XET": "1"}
    want = {n: (ADAPTERS / "lora" / n).read_bytes() for n in ("adapter_config.json", "adapter_model.safetensors")}
    with FakeHub(tokens={TOKEN: "tester"}, lfs_suffixes=()) as hub, \
            FakeHub(tokens={TOKEN: "tester"}, lfs_suffixes=()) as other:
        for h in (hub, other):
            seed(h, "tester/a", ADAPTERS / "lora")
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
        slowest = [0.0]

        def case(rng, i):
            cache, out = work / f"cache{i}", work / f"out{i}"
            monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
            hub.mangle = _mangler(rng, hub.url, other.url)
            before, around = _tree(tmp_path), sorted(os.listdir(tmp_path.parent))
            t0 = time.monotonic()
            code = _cli_case(["-q", "pull", "tester/a", "-o", out], [out], env=env, cwd=work / "cwd")
            took = time.monotonic() - t0
            slowest[0] = max(slowest[0], took)
            assert took < timeout + 5, (i, took)
            new = {p for p in _tree(tmp_path) - before if not p.startswith((f"w/cache{i}", f"w/out{i}"))}
            assert not new, (i, sorted(new)[:5])
            assert sorted(os.listdir(tmp_path.parent)) == around
            if code == 0:
                assert {n: (out / n).read_bytes() for n in want} == want, i
            shutil.rmtree(cache, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
            return code

        hub.mangle = None
        assert _cli_case(["-q", "pull", "tester/a", "-o", work / "honest"], [], env=env, cwd=work / "cwd") == 0
        _counted("hub-pull", 48 * SCALE, case)
        print(f"slowest pull {slowest[0]:.1f}s")
