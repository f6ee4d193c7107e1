"""Damaged merge records, writes the disk refuses, and metadata that contradicts tensors.

Each case gets one line on stderr and exit code 2 (or the matching LoraToolsError), and nothing is left
at the output. See docs/reliability.md, "Records, full disks and lying metadata".
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import types
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from loratools import read_adapter
from loratools.errors import CorruptFileError, WrongBaseError
from loratools.io import load_safetensors, save_safetensors
from loratools.merge.jobs import merge_model, unmerge_model
from loratools.merge.patch import apply_patch, check_patch, make_patch

from test_user_errors import assert_one_line_error

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "fixtures" / "tiny-llama"
LORA = ROOT / "fixtures" / "adapters" / "lora"
KEY = "model.layers.0.self_attn.v_proj.weight"  # 64 × 128 float32 in the tiny model; its patch is ulps + idx/val


# ------------------------------------------------------------------- 1. merge-record patch parts

def _u8(n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.uint8)


def _spec(b: int, lo: int) -> torch.Tensor:
    return torch.tensor([b, lo], dtype=torch.int64)


#: a damaged patch for KEY (64·128 float32 values) → the part the refusal must name
DAMAGED: dict[str, tuple[Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]], str]] = {
    "b = 0": (lambda p: {**p, "ulps_spec": _spec(0, 0)}, "ulps_spec"),
    "b = -1": (lambda p: {**p, "ulps_spec": _spec(-1, 0)}, "ulps_spec"),
    "b = 16": (lambda p: {**p, "ulps_spec": _spec(16, -(1 << 15))}, "ulps_spec"),
    "lo off": (lambda p: {**p, "ulps_spec": _spec(8, 5)}, "ulps_spec"),
    "spec as float": (lambda p: {**p, "ulps_spec": p["ulps_spec"].double()}, "ulps_spec"),
    "spec of 3": (lambda p: {**p, "ulps_spec": torch.tensor([8, -128, 0])}, "ulps_spec"),
    "short ulps": (lambda p: {**p, "ulps": p["ulps"][:-1].clone()}, "ulps"),
    "ulps as int16": (lambda p: {**p, "ulps": p["ulps"].to(torch.int16)}, "ulps"),
    "ulps 2-D": (lambda p: {**p, "ulps": p["ulps"].reshape(2, -1).clone()}, "ulps"),
    "ulps alone": (lambda p: {"ulps": p["ulps"]}, "ulps"),
    "index past the end": (lambda p: {**p, "idx": torch.full_like(p["idx"], 64 * 128)}, "idx"),
    "negative index": (lambda p: {**p, "idx": torch.full_like(p["idx"], -1)}, "idx"),
    "index as float": (lambda p: {**p, "idx": p["idx"].float()}, "idx"),
    "short val": (lambda p: {**p, "val": p["val"][:-1].clone()}, "val"),
    "val as bf16": (lambda p: {**p, "val": p["val"].bfloat16()}, "val"),
    "idx without val": (lambda p: {k: v for k, v in p.items() if k != "val"}, "idx"),
    "full of another shape": (lambda p: {"full": torch.zeros(64 * 128)}, "full"),
    "full of another dtype": (lambda p: {"full": torch.zeros(64, 128, dtype=torch.float16)}, "full"),
    "full and more": (lambda p: {**p, "full": torch.zeros(64, 128)}, "full"),
    "unknown part": (lambda p: {**p, "mystery": _u8(3)}, "mystery"),
}


@pytest.fixture(scope="module")
def merged(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("rec")
    merge_model(TINY, [read_adapter(LORA)], d / "m", record=d / "r.safetensors")
    return {"dir": d, "merged": d / "m", "record": d / "r.safetensors"}


def _damaged_record(merged: dict[str, Path], out: Path, damage) -> Path:
    tensors, meta = load_safetensors(merged["record"])
    patch = {k.rpartition("::")[2]: t for k, t in tensors.items() if k.startswith(KEY + "::")}
    assert set(patch) == {"ulps", "ulps_spec", "idx", "val"}, set(patch)
    rest = {k: t for k, t in tensors.items() if not k.startswith(KEY + "::")}
    save_safetensors({**rest, **{f"{KEY}::{p}": t for p, t in damage(patch).items()}}, out, meta)
    return out


@pytest.mark.parametrize("case", list(DAMAGED))
def test_a_damaged_record_part_is_one_line_naming_record_and_part(merged, tmp_path, cli, case) -> None:
    damage, part = DAMAGED[case]
    bad = _damaged_record(merged, tmp_path / "bad.safetensors", damage)
    res = cli("unmerge", merged["merged"], LORA, "-o", tmp_path / "u", "--record", bad)
    assert_one_line_error(res, str(bad), KEY, f"part `{part}`")
    assert not (tmp_path / "u").exists() and sorted(os.listdir(tmp_path)) == ["bad.safetensors"]


def test_check_patch_accepts_what_make_patch_writes() -> None:
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        w0 = torch.randn(33, 17, generator=g).to(dtype)
        for scale in (1e-3, 0.3, 30.0):  # sparse, packed counts, W0 whole
            r = (w0.double() + scale * torch.randn(33, 17, generator=g, dtype=torch.float64)).to(dtype)
            p = make_patch(w0, r)
            check_patch(p, w0.shape, dtype)
            assert apply_patch(r, p).equal(w0)


def test_check_patch_names_the_part() -> None:
    with pytest.raises(ValueError, match="part `ulps_spec`.*b = 16"):
        check_patch({"ulps": _u8(8), "ulps_spec": _spec(16, 0)}, (4,), torch.float32)


# ------------------------------------------------------------------- 2. a truncated GGUF xor_deflate patch

def _restorer(data: bytes):
    """A :class:`PatchRestorer` inflating ``data``, without the GGUF file around it."""
    from loratools.merge.gguf_record import PatchRestorer

    r = object.__new__(PatchRestorer)
    r.t, r.qtype, r.record = types.SimpleNamespace(name="blk.0.attn_q.weight", shape=(64, 64)), "Q8_0", Path("r")
    r.xor, r.tail = zlib.decompressobj(), data
    return r


@pytest.mark.parametrize("data", [b"", zlib.compress(bytes(5000))[:-8], zlib.compress(bytes(5000))[:3]],
                         ids=["empty", "truncated", "header only"])
def test_a_truncated_xor_deflate_patch_is_refused_not_spun_on(data: bytes) -> None:
    def spun(signum, frame):
        raise TimeoutError("PatchRestorer._xor spins on a truncated stream")

    old = signal.signal(signal.SIGALRM, spun)
    signal.alarm(10)
    try:
        with pytest.raises(CorruptFileError, match="xor_deflate ends early"):
            _restorer(data)._xor(5000)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_a_whole_xor_deflate_stream_still_inflates() -> None:
    payload = np.arange(5000, dtype=np.uint32).astype(np.uint8).tobytes()
    r = _restorer(zlib.compress(payload))
    assert r._xor(3000).tobytes() + r._xor(2000).tobytes() == payload


# ------------------------------------------------------------------- 3. a refused GGUF --record leaves no scratch

def test_a_refused_gguf_record_leaves_no_scratch(tmp_path: Path) -> None:
    """A merge refused after the record's writer was made (``_recorder``'s layout check) leaves no scratch."""
    pytest.importorskip("gguf")
    from loratools.errors import InvalidOptionError
    import re

    from test_merge_gguf import NAMES, _write_gguf

    tensors, _ = load_safetensors(TINY / "model.safetensors")
    weights = {}
    for k, t in tensors.items():
        m = re.fullmatch(r"model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.weight", k)
        if m:
            weights[f"blk.{m[1]}.{NAMES[m[2]]}.weight"] = (t.float().numpy(), "F32")
    base = tmp_path / "b.gguf"
    _write_gguf(base, weights)
    (tmp_path / "tail.gguf").write_bytes(base.read_bytes() + b"\0" * 64)  # bytes after the last tensor
    with pytest.raises(InvalidOptionError, match="byte for byte"):
        merge_model(tmp_path / "tail.gguf", [read_adapter(LORA)], tmp_path / "m.gguf",
                    record=tmp_path / "r.safetensors")
    assert not [p for p in os.listdir(tmp_path) if "scratch" in p or p.startswith((".r.", ".m."))]


def test_a_record_writer_makes_its_scratch_only_for_a_patch(tmp_path: Path) -> None:
    from loratools.merge.record import RecordWriter

    w = RecordWriter(tmp_path / "r.safetensors", tmp_path / ".r.tmp")
    w.add("a", {}, "xxh3_128:" + "0" * 32)  # a tensor the merge gives back bit for bit: nothing to keep
    assert not w.scratch.exists()
    w.add("b", {"full": torch.zeros(3)}, "xxh3_128:" + "0" * 32)
    assert w.scratch.exists()
    w.close()
    assert not w.scratch.exists()


# ------------------------------------------------------------------- 4. the disk refuses a write

@pytest.fixture
def small_disk(tmp_path: Path):
    d = tmp_path / "disk"
    d.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(d)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"cannot mount a small tmpfs here ({e}); the monkeypatched tests below cover the mapping")
    yield d
    busy = subprocess.run(["umount", str(d)], check=False, capture_output=True).returncode
    if busy:  # a descriptor a writer left open on the full disk (then detached, so pytest can remove the folder)
        subprocess.run(["umount", "-l", str(d)], check=False, capture_output=True)
    assert not busy, "a writer left a file open on the refused output's disk"


@pytest.mark.parametrize("args", [
    ["merge", TINY, LORA, "-o", "{d}/m"],  # the model writer (ShardWriter, os.pwrite)
    ["merge", TINY, LORA, "-o", "{d}/m.safetensors"],
    ["convert", LORA, "-o", "{d}/a.safetensors", "--to", "kohya"],  # safetensors' own save_file
    ["convert", LORA, "-o", "{d}/a.gguf", "--to", "gguf", "--base", TINY],  # the gguf package (numpy's tofile)
], ids=["model-dir", "model-file", "kohya", "gguf"])
def test_a_full_disk_is_one_line_and_leaves_nothing(small_disk: Path, cli, args) -> None:
    (small_disk / "filler").write_bytes(b"\0" * 48 * 1024)
    res = cli(*[str(a).format(d=small_disk) for a in args])
    out = str(args[args.index("-o") + 1]).format(d=small_disk)
    assert_one_line_error(res, f"no space left on device while writing {out}; nothing was written")
    assert sorted(os.listdir(small_disk)) == ["filler"]


@pytest.mark.parametrize("code", [errno.EIO, errno.EBUSY, errno.ENOSPC])
def test_a_safetensors_error_with_an_errno_is_one_line(tmp_path: Path, cli, monkeypatch, code: int) -> None:
    import loratools.io.safetensors as st

    def refused(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise RuntimeError(f"Error while serializing: I/O error: {os.strerror(code)} (os error {code})")

    monkeypatch.setattr(st, "save_file", _named("SafetensorError", refused))
    res = cli("convert", LORA, "-o", tmp_path / "a.safetensors", "--to", "kohya")
    reason = os.strerror(code)
    assert_one_line_error(res, f"{reason[0].lower()}{reason[1:]} while writing {tmp_path / 'a.safetensors'}",
                          "nothing was written")
    assert sorted(os.listdir(tmp_path)) == []


def _named(name: str, fn):
    """``fn``, raising its RuntimeError as an exception class called ``name`` (as safetensors' Rust side does)."""
    cls = type(name, (Exception,), {})

    def call(*a, **k):
        try:
            return fn(*a, **k)
        except RuntimeError as e:
            raise cls(str(e)) from None

    return call


@pytest.mark.parametrize("code", [errno.EIO, errno.EBUSY])
def test_an_oserror_the_cli_did_not_map_is_one_line(tmp_path: Path, cli, monkeypatch, code: int) -> None:
    import loratools.io.safetensors as st

    def pwrite(fd, data, offset):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(st.os, "pwrite", pwrite)
    res = cli("merge", TINY, LORA, "-o", tmp_path / "m")
    monkeypatch.undo()
    assert_one_line_error(res, f"while writing {tmp_path / 'm'}; nothing was written")
    assert sorted(os.listdir(tmp_path)) == []


# ------------------------------------------------------------------- 5. metadata that contradicts the tensors

def test_kohya_names_metadata_swapping_layers_is_refused(tmp_path: Path, cli) -> None:
    from loratools.formats import write_adapter
    from loratools.formats.kohya import NAMES_KEY

    write_adapter(read_adapter(LORA), tmp_path / "k.safetensors", format="kohya")
    tensors, meta = load_safetensors(tmp_path / "k.safetensors")
    names = json.loads(meta[NAMES_KEY])
    a, b = sorted(names)[:2]
    names[a], names[b] = names[b], names[a]
    save_safetensors(tensors, tmp_path / "bad.safetensors", {**meta, NAMES_KEY: json.dumps(names)})
    with pytest.raises(CorruptFileError, match="metadata and the tensors disagree"):
        read_adapter(tmp_path / "bad.safetensors")
    assert_one_line_error(cli("inspect", tmp_path / "bad.safetensors"), NAMES_KEY, "disagree")


def _single(tmp_path: Path) -> tuple[dict, dict]:
    from loratools.formats import write_adapter

    write_adapter(read_adapter(LORA), tmp_path / "s.safetensors", format="loratools")
    return load_safetensors(tmp_path / "s.safetensors")


def test_single_file_modules_list_omitting_a_module_is_refused(tmp_path: Path) -> None:
    tensors, meta = _single(tmp_path)
    info = json.loads(meta["modules"])
    dropped = sorted(info)[0]
    del info[dropped]
    save_safetensors(tensors, tmp_path / "bad.safetensors", {**meta, "modules": json.dumps(info)})
    with pytest.raises(CorruptFileError, match=f"{dropped}.*does not list"):
        read_adapter(tmp_path / "bad.safetensors")


def test_single_file_embedding_kind_on_a_square_projection_is_refused(tmp_path: Path) -> None:
    tensors, meta = _single(tmp_path)
    info = json.loads(meta["modules"])
    square = next(n for n in sorted(info) if tensors[f"{n}.lora_A"].shape[1] == tensors[f"{n}.lora_B"].shape[0])
    info[square]["kind"] = "embedding"
    save_safetensors(tensors, tmp_path / "bad.safetensors", {**meta, "modules": json.dumps(info)})
    with pytest.raises(CorruptFileError, match=f"{square} is an embedding.*square projection"):
        read_adapter(tmp_path / "bad.safetensors")


def _gguf_adapter(tmp_path: Path) -> tuple[Path, bytes]:
    pytest.importorskip("gguf")
    from conftest import run_cli

    out = tmp_path / "a.gguf"
    assert run_cli("convert", LORA, "-o", out, "--to", "gguf", "--base", TINY).returncode == 0
    return out, out.read_bytes()


def _rewrite_gguf(src: Path, dst: Path, edit: Callable[[str, object], object]) -> None:
    """Copy the GGUF adapter ``src`` to ``dst`` with each KV value passed through ``edit(key, value)``."""
    import gguf

    r = gguf.GGUFReader(src)
    arch = str(r.fields["general.architecture"].contents())
    w = gguf.GGUFWriter(str(dst), arch)
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = edit(key, f.contents())
        vtype = f.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_array(key, value)
        else:
            w.add_key_value(key, value, vtype)
    for t in r.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_shape=list(reversed([int(x) for x in t.shape])),
                     raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_adapter_hf_names_naming_another_layer_is_refused(tmp_path: Path) -> None:
    src, _ = _gguf_adapter(tmp_path)

    def swap(key, value):
        if key != "loratools.hf_names":
            return value
        pairs = [v.split("=", 1) for v in value]
        (g0, h0), (g1, h1) = pairs[0], pairs[1]
        return [f"{g0}={h1}", f"{g1}={h0}", *("=".join(p) for p in pairs[2:])]

    _rewrite_gguf(src, tmp_path / "bad.gguf", swap)
    with pytest.raises(CorruptFileError, match="hf_names.*disagree"):
        read_adapter(tmp_path / "bad.gguf")


def test_gguf_adapter_head_counts_the_tensors_contradict_are_refused(tmp_path: Path) -> None:
    src, _ = _gguf_adapter(tmp_path)
    ok = read_adapter(src)
    import gguf

    r = gguf.GGUFReader(src)
    arch = str(r.fields["general.architecture"].contents())
    n, kv = int(r.fields[f"{arch}.attention.head_count"].contents()), \
        int(r.fields[f"{arch}.attention.head_count_kv"].contents())
    # swapped counts still divide every q/k row count, so the un-permutation would be silently wrong
    assert n != kv, "the tiny model needs grouped-query heads for this test"
    _rewrite_gguf(src, tmp_path / "bad.gguf",
                  lambda key, v: {f"{arch}.attention.head_count": kv, f"{arch}.attention.head_count_kv": n}.get(key, v))
    with pytest.raises(CorruptFileError, match="head counts"):
        read_adapter(tmp_path / "bad.gguf")
    from loratools.formats.gguf import base_from_gguf, read_gguf

    with pytest.raises(WrongBaseError, match="attention heads"):  # a base's counts against the file's own
        read_gguf(tmp_path / "bad.gguf", base=base_from_gguf(src))
    assert ok.modules  # the untouched file still reads
