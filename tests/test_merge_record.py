"""Exact un-merge with a record; honest error figures without one; the streaming writer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from loratools import read_adapter
from loratools.io import load_safetensors, save_safetensors
from loratools.merge.kernels import jitter
from loratools.merge.jobs import merge_model, unmerge_model, verify_merge
from loratools.merge.patch import apply_patch, bits, make_patch
from loratools.io import Entry, ShardWriter, read_tensor, tensor_spans


@pytest.fixture(scope="module")
def bf16_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = Path(__file__).resolve().parent.parent / "fixtures" / "tiny-llama" / "model.safetensors"
    tensors, meta = load_safetensors(root)
    out = tmp_path_factory.mktemp("bf16") / "base.safetensors"
    save_safetensors({k: v.to(torch.bfloat16) for k, v in tensors.items()}, out, meta)
    return out


@pytest.mark.parametrize("name", ["lora", "rslora", "adalora"])
def test_bf16_record_is_bit_exact_and_estimate_matches(name: str, bf16_base: Path, adapters: Path, tmp_path: Path) -> None:
    ad = read_adapter(adapters / name)
    rec = tmp_path / "rec.safetensors"
    m = merge_model(bf16_base, [(ad, 1.0)], tmp_path / "m.safetensors", record=rec, device="cpu")
    assert 0 < m.record_nbytes < 0.5 * m.nbytes  # smaller than even the adapted tensors stored whole
    base, _ = load_safetensors(bf16_base)
    merged, _ = load_safetensors(tmp_path / "m.safetensors")
    assert all(v.dtype == torch.bfloat16 for v in merged.values())

    exact = unmerge_model(tmp_path / "m.safetensors", [(ad, 1.0)], tmp_path / "u1.safetensors", record=rec, device="cpu")
    assert exact.exact
    got, _ = load_safetensors(tmp_path / "u1.safetensors")
    assert all(torch.equal(bits(got[k]), bits(base[k])) for k in base)

    approx = unmerge_model(tmp_path / "m.safetensors", [(ad, 1.0)], tmp_path / "u2.safetensors", device="cpu")
    got, _ = load_safetensors(tmp_path / "u2.safetensors")
    keys = [k for k in base if not torch.equal(merged[k], base[k])]
    err = {k: got[k].double() - base[k].double() for k in keys}
    true_max = max(float(e.abs().max()) for e in err.values())
    true_rel = (sum(float((e * e).sum()) for e in err.values()) / sum(float((base[k].double() ** 2).sum()) for k in keys)) ** 0.5
    assert true_max > 0  # bfloat16 really loses something here, or this test proves nothing
    assert true_max / 2 <= approx.est_max_abs_error <= true_max * 2
    assert true_rel * 0.7 <= approx.est_rel_error <= true_rel * 1.3
    assert true_max <= approx.error_bound


def test_record_for_other_adapter_is_refused(bf16_base: Path, adapters: Path, tmp_path: Path) -> None:
    from loratools.errors import WrongBaseError

    ad = read_adapter(adapters / "lora")
    merge_model(bf16_base, [(ad, 1.0)], tmp_path / "m.safetensors", record=tmp_path / "r.safetensors", device="cpu")
    with pytest.raises(WrongBaseError):
        unmerge_model(tmp_path / "m.safetensors", [(ad, 0.5)], tmp_path / "u.safetensors",
                      record=tmp_path / "r.safetensors", device="cpu")
    assert not (tmp_path / "u.safetensors").exists()


def test_verify_catches_a_tampered_merge(bf16_base: Path, adapters: Path, tmp_path: Path) -> None:
    ad = read_adapter(adapters / "lora")
    merge_model(bf16_base, [(ad, 1.0)], tmp_path / "m.safetensors", device="cpu")
    good = verify_merge(bf16_base, [(ad, 1.0)], tmp_path / "m.safetensors", device="cpu")
    assert good.ok and 0 < good.max_abs and good.worst is not None and good.worst.ratio <= 1
    t, meta = load_safetensors(tmp_path / "m.safetensors")
    k = "model.layers.1.self_attn.v_proj.weight"
    t[k] = t[k].clone()
    t[k][3, 5] += 0.05
    save_safetensors(t, tmp_path / "bad.safetensors", meta)
    bad = verify_merge(bf16_base, [(ad, 1.0)], tmp_path / "bad.safetensors", device="cpu")
    assert not bad.ok and bad.worst is not None and bad.worst.key == k and bad.worst.ratio > 1


dtypes = st.sampled_from([torch.bfloat16, torch.float16, torch.float32])


@settings(max_examples=40, deadline=None)
@given(dtype=dtypes, n=st.integers(1, 300), scale=st.floats(1e-6, 10.0), seed=st.integers(0, 2**16))
def test_patch_round_trip_is_exact(dtype: torch.dtype, n: int, scale: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    w0 = (torch.randn(n, generator=g) * 0.05).to(dtype)
    w0[0] = -0.0 if n > 1 else w0[0]
    d = torch.randn(n, generator=g) * 0.05 * scale
    r = ((w0.float() + d).to(dtype).float() - d).to(dtype)
    patch = make_patch(w0, r)
    assert torch.equal(bits(apply_patch(r, patch)), bits(w0))
    assert sum(t.numel() * t.element_size() for t in patch.values()) <= w0.numel() * w0.element_size()


def test_jitter_moves_by_whole_ulps_and_keeps_sign() -> None:
    t = torch.tensor([1.0, -1.0, 0.5, -3e-3, 0.0], dtype=torch.bfloat16)
    j = jitter(t, seed=3)
    assert torch.equal(torch.sign(j[:4]), torch.sign(t[:4]))
    assert float((j.float() - t.float()).abs().max()) <= 2 * 2**-7 + 1e-9


def test_shard_writer_streams_a_valid_file(tmp_path: Path) -> None:
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int64), "c": torch.randn(2).to(torch.bfloat16),
               "empty": torch.zeros(0, 3), "scalar": torch.tensor(2.5)}
    src = tmp_path / "src.safetensors"
    save_safetensors(tensors, src, {"k": "v"})
    spans, _ = tensor_spans(src)
    entries = [Entry(k, spans[k].dtype, spans[k].shape) for k in tensors]
    with ShardWriter(tmp_path / "out.safetensors", entries, {"x": "1"}) as w:
        for k in tensors:
            if k == "a":
                w.write(k, read_tensor(spans[k]))
            else:
                w.copy_from(k, spans[k])
    back = load_file(str(tmp_path / "out.safetensors"))
    assert set(back) == set(tensors) and all(torch.equal(back[k], tensors[k]) for k in tensors)
    header_len = int.from_bytes((tmp_path / "out.safetensors").read_bytes()[:8], "little")
    assert header_len % 8 == 0
    assert json.loads((tmp_path / "out.safetensors").read_bytes()[8:8 + header_len])["__metadata__"] == {"x": "1"}


def test_untouched_tensors_are_copied_byte_for_byte(tiny_llama: Path, adapters: Path, tmp_path: Path) -> None:
    merge_model(tiny_llama, [(read_adapter(adapters / "lora"), 1.0)], tmp_path / "m", device="cpu")
    a, _ = tensor_spans(tiny_llama / "model.safetensors")
    b, _ = tensor_spans(tmp_path / "m" / "model.safetensors")
    raw_a, raw_b = (tiny_llama / "model.safetensors").read_bytes(), (tmp_path / "m" / "model.safetensors").read_bytes()
    same = [k for k in a if raw_a[a[k].start:a[k].end] == raw_b[b[k].start:b[k].end]]
    assert len(same) == len(a) - 8  # the 8 q/v projections of the LoRA fixture changed, nothing else


def test_a_record_from_before_xxh3_with_sha256_checksums_still_restores(bf16_base: Path, adapters: Path,
                                                                        tmp_path: Path) -> None:
    """Records written before 2026-11-24 keep bare sha256 hex under ``sha256``: they still restore, and are checked."""
    import hashlib

    from loratools.errors import CorruptFileError

    ad = read_adapter(adapters / "lora")
    rec = tmp_path / "rec.safetensors"
    merge_model(bf16_base, [(ad, 1.0)], tmp_path / "m.safetensors", record=rec, device="cpu")
    parts, meta = load_safetensors(rec)
    base, _ = load_safetensors(bf16_base)
    digests = json.loads(meta.pop("digests"))
    assert all(v.startswith("xxh3_128:") for v in digests.values())
    old = {k: hashlib.sha256(base[k].contiguous().view(torch.uint8).numpy().tobytes()).hexdigest() for k in digests}
    save_safetensors(parts, tmp_path / "old.safetensors", {**meta, "sha256": json.dumps(old)})
    unmerge_model(tmp_path / "m.safetensors", [(ad, 1.0)], tmp_path / "u", record=tmp_path / "old.safetensors",
                  device="cpu")
    got, _ = load_safetensors(tmp_path / "u")
    assert all(torch.equal(bits(got[k]), bits(base[k])) for k in base)
    wrong = {k: hashlib.sha256(b"not it").hexdigest() for k in digests}
    save_safetensors(parts, tmp_path / "bad.safetensors", {**meta, "sha256": json.dumps(wrong)})
    with pytest.raises(CorruptFileError, match="did not give the base's bits back"):
        unmerge_model(tmp_path / "m.safetensors", [(ad, 1.0)], tmp_path / "u2", record=tmp_path / "bad.safetensors",
                      device="cpu")
    assert not (tmp_path / "u2").exists()


def test_a_record_with_another_precision_is_refused_as_damaged(bf16_base: Path, adapters: Path, tmp_path: Path) -> None:
    """The un-merge replays the merge in the record's precision: a value other than float32/float64 names the
    record and the field, not the `precision` option the user never gave."""
    from loratools.errors import InvalidFieldError
    from loratools.merge.plan import METADATA_KEY

    ad = read_adapter(adapters / "lora")
    merge_model(bf16_base, [(ad, 1.0)], tmp_path / "m.safetensors", record=tmp_path / "r.safetensors", device="cpu")
    parts, meta = load_safetensors(tmp_path / "r.safetensors")
    stamp = json.loads(meta[METADATA_KEY])
    assert stamp["precision"] == "float32"
    save_safetensors(parts, tmp_path / "bad.safetensors", {**meta, METADATA_KEY: json.dumps({**stamp, "precision": "int8"})})
    with pytest.raises(InvalidFieldError, match="bad.safetensors.*precision"):
        unmerge_model(tmp_path / "m.safetensors", [(ad, 1.0)], tmp_path / "u", record=tmp_path / "bad.safetensors",
                      device="cpu")
    assert not (tmp_path / "u").exists()


def test_a_patch_arriving_after_close_makes_no_scratch(tmp_path: Path) -> None:
    """After an interrupt the job closes its record while a worker may still finish a tensor: that late patch
    must not make the scratch file again beside the record (the cleanup has already run)."""
    from loratools.merge.record import RecordWriter

    rec = RecordWriter(tmp_path / "rec.safetensors", tmp_path / ".rec.tmp")
    rec.add("a.weight", {"idx": torch.arange(3)}, "digest")
    assert rec.scratch.exists()
    rec.close()
    assert not rec.scratch.exists()
    rec.add("b.weight", {"idx": torch.arange(3)}, "digest")
    assert list(tmp_path.iterdir()) == []
