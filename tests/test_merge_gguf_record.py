"""``merge --record`` and ``unmerge --record`` for GGUF models: the original file back byte for byte.

The tiny model of ``test_merge_gguf`` (F32, F16, BF16, Q8_0, Q4_0, Q4_K, Q6_K … tensors, a large ΔW) is merged
with a record and un-merged with it; the un-merged file's sha256 must be the original's — with the types kept
(``quant="same"``), with every adapted tensor changed to Q8_0 or to F16, and for a model split in three files.
Without the record, the un-merge is not the original (so the record is what makes it exact).
"""

from __future__ import annotations

import hashlib
import json
import zlib
from pathlib import Path

import numpy as np
import pytest

from loratools import read_adapter
from loratools.errors import CorruptFileError, InvalidOptionError, WrongBaseError
from loratools.merge.jobs import merge_model, unmerge_model
from loratools.merge.gguf_record import _XorDiff

from test_merge_gguf import _write_gguf, tiny  # noqa: F401  (the fixture)

gguf = pytest.importorskip("gguf")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _round_trip(base: Path, ad, tmp: Path, quant: str | None) -> tuple:
    rep = merge_model(base, [ad], tmp / "m.gguf", quant=quant, record=tmp / "r.safetensors")
    back = unmerge_model(rep.files[0], [ad], tmp / "u.gguf", record=tmp / "r.safetensors")
    return rep, back


@pytest.mark.parametrize("quant", [None, "q8_0", "f16"])
def test_record_gives_the_original_file_back_byte_for_byte(tiny: dict, tmp_path: Path, quant: str | None) -> None:
    ad = read_adapter(tiny["adapter"])
    rep, back = _round_trip(tiny["gguf"], ad, tmp_path, quant)
    assert _sha(tmp_path / "u.gguf") == _sha(tiny["gguf"]) and back.exact
    assert _sha(tmp_path / "m.gguf") != _sha(tiny["gguf"])
    adapted = sum(int(t.n_bytes) for t in gguf.GGUFReader(str(tiny["gguf"])).tensors if t.name in tiny["exact"])
    assert 0 < rep.record_nbytes < adapted + 4096
    print(f"quant={quant}: record {rep.record_nbytes} bytes of patches, {rep.record_nbytes / adapted:.3f} of the "
          f"adapted tensors' {adapted} bytes")
    unmerge_model(tmp_path / "m.gguf", [ad], tmp_path / "plain.gguf", quant=None if quant is None else "same")
    assert _sha(tmp_path / "plain.gguf") != _sha(tiny["gguf"])  # without the record it is not exact


def test_record_of_a_split_model(tiny: dict, tmp_path: Path) -> None:
    _write_gguf(tmp_path / "sp.gguf", tiny["weights"], split=6)
    first = tmp_path / "sp-00001-of-00003.gguf"
    ad = read_adapter(tiny["adapter"])
    rep = merge_model(first, [ad], tmp_path / "m.gguf", quant="q8_0", record=tmp_path / "r.safetensors")
    back = unmerge_model(rep.files[0], [ad], tmp_path / "u.gguf", record=tmp_path / "r.safetensors")
    assert [p.name for p in back.files] == [f"u-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    for i, p in enumerate(back.files, 1):
        assert _sha(p) == _sha(tmp_path / f"sp-0000{i}-of-00003.gguf")


def test_the_record_refuses_what_it_was_not_made_for(tiny: dict, tmp_path: Path) -> None:
    ad = read_adapter(tiny["adapter"])
    merge_model(tiny["gguf"], [ad], tmp_path / "m.gguf", record=tmp_path / "r.safetensors")
    with pytest.raises(WrongBaseError, match="record"):  # other weights than the merge's
        unmerge_model(tmp_path / "m.gguf", [(ad, 0.5)], tmp_path / "u.gguf", record=tmp_path / "r.safetensors")
    with pytest.raises(InvalidOptionError, match="`quant` comes from the record"):
        unmerge_model(tmp_path / "m.gguf", [ad], tmp_path / "u.gguf", record=tmp_path / "r.safetensors", quant="f32")
    # the merged model changed after the merge (a byte in every 64 of an F32 tensor, whose patch is sparse; a
    # quantized tensor of this large ΔW may be kept whole in the record): the restored bytes no longer hash right
    m = bytearray((tmp_path / "m.gguf").read_bytes())
    t = next(t for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors if t.name == "blk.1.ffn_gate.weight")
    for i in range(int(t.data_offset) + 2, int(t.data_offset) + int(t.n_bytes), 64):
        m[i] ^= 0x10
    (tmp_path / "bad.gguf").write_bytes(bytes(m))
    with pytest.raises(CorruptFileError, match="blk.1.ffn_gate.weight"):
        unmerge_model(tmp_path / "bad.gguf", [ad], tmp_path / "u.gguf", record=tmp_path / "r.safetensors")
    assert not (tmp_path / "u.gguf").exists()
    assert not list(tmp_path.glob(".u.gguf*"))


def test_a_record_naming_a_type_loratools_does_not_write_is_refused(tiny: dict, tmp_path: Path) -> None:
    """A damaged ``gguf`` stamp: one line naming the record, not a hint to choose another `quant`."""
    from loratools.io import load_safetensors, save_safetensors
    from loratools.merge.plan import METADATA_KEY

    ad = read_adapter(tiny["adapter"])
    merge_model(tiny["gguf"], [ad], tmp_path / "m.gguf", record=tmp_path / "r.safetensors")
    parts, meta = load_safetensors(tmp_path / "r.safetensors")
    stamp = json.loads(meta[METADATA_KEY])
    name = next(iter(stamp["gguf"]["types"]))
    stamp["gguf"]["types"][name] = "Q9_Z"
    save_safetensors(parts, tmp_path / "bad.safetensors", {**meta, METADATA_KEY: json.dumps(stamp)})
    with pytest.raises(CorruptFileError, match="bad.safetensors.*'Q9_Z'"):
        unmerge_model(tmp_path / "m.gguf", [ad], tmp_path / "u.gguf", record=tmp_path / "bad.safetensors")
    assert not (tmp_path / "u.gguf").exists()


def test_a_file_not_laid_out_as_llama_cpp_writes_is_refused_before_writing(tiny: dict, tmp_path: Path) -> None:
    (tmp_path / "tail.gguf").write_bytes(tiny["gguf"].read_bytes() + b"\0" * 64)  # bytes after the last tensor
    with pytest.raises(InvalidOptionError, match="byte for byte.*after its last tensor"):
        merge_model(tmp_path / "tail.gguf", [read_adapter(tiny["adapter"])], tmp_path / "m.gguf",
                    record=tmp_path / "r.safetensors")
    assert not (tmp_path / "m.gguf").exists() and not (tmp_path / "r.safetensors").exists()


def test_xor_patch_is_deflated_or_the_whole_tensor() -> None:
    rng = np.random.default_rng(0)
    o = rng.integers(0, 256, 4000, dtype=np.uint8)
    r = o.copy()
    r[[7, 2000]] ^= 3  # two bytes differ: the deflated XOR is tiny, and inflates to W0 ⊕ U
    d = _XorDiff(o.size)
    d.add(o, r)
    p = d.patch(lambda: o)
    assert set(p) == {"xor_deflate"} and p["xor_deflate"].numel() < 100
    assert np.array_equal(np.frombuffer(zlib.decompress(p["xor_deflate"].numpy().tobytes()), np.uint8) ^ r, o)
    d = _XorDiff(o.size)
    d.add(o, rng.integers(0, 256, 4000, dtype=np.uint8))  # every byte random: the whole tensor is smaller
    assert set(d.patch(lambda: o)) == {"raw"}
    d = _XorDiff(o.size)
    d.add(o, o.copy())
    assert d.patch(lambda: o) == {}


def test_cli_gguf_record(tiny: dict, tmp_path: Path, cli) -> None:
    r = cli("merge", tiny["gguf"], tiny["adapter"], "-o", tmp_path / "m.gguf", "--record", tmp_path / "r.safetensors")
    assert r.returncode == 0, r.stderr
    assert "record" in r.stdout
    r = cli("unmerge", tmp_path / "m.gguf", tiny["adapter"], "-o", tmp_path / "u.gguf", "--record",
            tmp_path / "r.safetensors", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["exact"] is True and _sha(tmp_path / "u.gguf") == _sha(tiny["gguf"])
    r = cli("unmerge", tmp_path / "m.gguf", tiny["adapter"], "-o", tmp_path / "v.gguf", "--record",
            tmp_path / "r.safetensors", "--quant", "f32")
    assert r.returncode == 2 and "--quant" in r.stderr and "Traceback" not in r.stderr
