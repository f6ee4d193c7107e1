"""The streaming merge's bytes against a straightforward whole-tensor computation, and the patch's choice.

The merge reads, computes and writes a block of rows at a time on several
threads, at planned offsets. Its output must be the bytes of the plain
formula, computed here on whole tensors with the factors formed from the
module's own fields: W = cast(W0 + Σᵢ (B · ((A ⊙ E) · s · wᵢ))), the product
added by one ``addmm`` in float32 per adapter.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loratools import Adapter, AdapterConfig, Module, read_adapter
from loratools.io import save_safetensors
from loratools.merge.jobs import merge_model, unmerge_model
from loratools.merge.kernels import bits
from loratools.merge.patch import make_patch


def reference(w0: torch.Tensor, parts: list[tuple[Module, float]], dtype: torch.dtype) -> torch.Tensor:
    acc = w0.to(torch.float32).reshape(w0.shape[0], -1)
    for m, weight in parts:
        assert m.kind == "linear" and not m.fan_in_fan_out
        A = m.A.to(torch.float32)
        if m.E is not None:
            A = A * m.E.to(torch.float32)
        A = A * m.scale
        if weight != 1.0:
            A = A * weight
        acc = torch.addmm(acc, m.B.to(torch.float32), A)
    return acc.to(dtype).reshape(w0.shape)


def _check(base: dict[str, torch.Tensor], merged: dict[str, torch.Tensor], ads: list[tuple[Adapter, float]],
           dtype: torch.dtype) -> int:
    changed = 0
    for key, w0 in base.items():
        parts = [(ad.modules[key[:-len(".weight")]], w) for ad, w in ads if key[:-len(".weight")] in ad.modules]
        want = reference(w0, parts, dtype) if parts else w0.to(dtype)
        assert merged[key].dtype == dtype and torch.equal(bits(merged[key]), bits(want)), key
        changed += bool(parts)
    return changed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_merge_bytes_equal_the_whole_tensor_formula(dtype: torch.dtype, tiny_llama: Path, adapters: Path,
                                                   tmp_path: Path) -> None:
    ads = [(read_adapter(adapters / "lora"), 0.5), (read_adapter(adapters / "adalora"), -0.25)]
    merge_model(tiny_llama, ads, tmp_path / "m", dtype=dtype, device="cpu")
    base = load_file(str(tiny_llama / "model.safetensors"))
    assert _check(base, load_file(str(tmp_path / "m" / "model.safetensors")), ads, dtype) > 0


@pytest.fixture(scope="module")
def blocky(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Adapter]:
    """A bfloat16 'model' whose tensors span several blocks of rows, some at offsets that are not whole bytes
    of packed ulp counts (3 columns: blocks of 87381 rows), and a LoRA on them."""
    g = torch.Generator().manual_seed(7)
    shapes = {"a.weight": (3000, 300), "b.weight": (100_000, 3), "c.weight": (40, 50), "norm.weight": (300,)}
    tensors = {k: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}
    path = tmp_path_factory.mktemp("blocky") / "model.safetensors"
    save_safetensors(tensors, path)
    mods = {k[:-len(".weight")]: Module(A=torch.randn(4, s[1], generator=g) * 0.1,
                                        B=torch.randn(s[0], 4, generator=g) * 0.1, alpha=8, scale=2.0)
            for k, s in shapes.items() if len(s) == 2}
    return path, Adapter(mods, AdapterConfig())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_blocks_and_threads_change_no_byte(dtype: torch.dtype, blocky: tuple[Path, Adapter], tmp_path: Path) -> None:
    path, ad = blocky
    merge_model(path, [(ad, 0.75)], tmp_path / "m.safetensors", dtype=dtype, device="cpu")
    assert _check(load_file(str(path)), load_file(str(tmp_path / "m.safetensors")), [(ad, 0.75)], dtype) == 3


def test_record_round_trip_across_blocks(blocky: tuple[Path, Adapter], tmp_path: Path) -> None:
    path, ad = blocky
    rec = tmp_path / "r.safetensors"
    report = merge_model(path, [(ad, 0.75)], tmp_path / "m.safetensors", record=rec, device="cpu")
    assert 0 < report.record_nbytes
    back = unmerge_model(tmp_path / "m.safetensors", [(ad, 0.75)], tmp_path / "u.safetensors", record=rec,
                         device="cpu")
    assert back.exact
    base, got = load_file(str(path)), load_file(str(tmp_path / "u.safetensors"))
    assert all(torch.equal(bits(got[k]), bits(base[k])) for k in base)
    # each stored patch is the one make_patch chooses for the whole tensor
    merged, patches = load_file(str(tmp_path / "m.safetensors")), load_file(str(rec))
    for key in ("a.weight", "b.weight"):
        m = ad.modules[key[:-len(".weight")]]
        whole = make_patch(base[key], reference(merged[key], [(m, -0.75)], torch.bfloat16))
        assert whole and {k.split("::")[1] for k in patches if k.startswith(key + "::")} == set(whole)
        assert all(torch.equal(patches[f"{key}::{p}"], t) for p, t in whole.items()), key


def _patch_reference(w0: torch.Tensor, r: torch.Tensor) -> tuple[str, ...]:
    """The parts and sizes of the smallest patch, from ulp counts computed in int64 on whole tensors."""
    width = w0.element_size()
    ints = {2: torch.int16, 4: torch.int32}[width]

    def key(t: torch.Tensor) -> torch.Tensor:
        b = t.view(ints).to(torch.int64)
        mag = b & ((1 << (8 * width - 1)) - 1)
        return torch.where(b < 0, -mag - 1, mag)

    d = key(w0) - key(r)
    n = d.numel()
    if not bool((d != 0).any()):
        return ()
    sizes = {-1: n * width}
    for b in (0, 1, 2, 4, 8):
        lo, hi = (0, 0) if b == 0 else (-(1 << (b - 1)), (1 << (b - 1)) - 1)
        exceptions = int(((d < lo) | (d > hi)).sum())
        sizes[b] = (n * b + 7) // 8 + 16 * (b > 0) + exceptions * (width + 4)
    b = min((-1, 0, 1, 2, 4, 8), key=lambda c: sizes[c])  # the first of equals wins: full, then 0, 1, 2, 4, 8
    if b < 0:
        return ("full",)
    parts = ("ulps", "ulps_spec") if b > 0 else ()
    lo, hi = (0, 0) if b == 0 else (-(1 << (b - 1)), (1 << (b - 1)) - 1)
    return parts + (("idx", "val") if bool(((d < lo) | (d > hi)).any()) else ())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("scale", [1e-4, 0.3, 3.0])
def test_patch_choice_matches_whole_tensor_counts(dtype: torch.dtype, scale: float) -> None:
    g = torch.Generator().manual_seed(int(scale * 1e4))
    w0 = (torch.randn(700_001, generator=g) * 0.05).to(dtype)
    d = torch.randn(w0.shape, generator=g) * 0.05 * scale
    r = ((w0.double() + d).to(dtype).double() - d).to(dtype)
    r[::9973] = -r[::9973]  # a few counts far beyond a byte
    patch = make_patch(w0, r)
    assert tuple(patch) == _patch_reference(w0, r)
    if "ulps_spec" in patch:
        b = int(patch["ulps_spec"][0])
        assert patch["ulps"].numel() == (w0.numel() * b + 7) // 8


def test_progress_is_told_the_total_first(tiny_llama: Path, adapters: Path, tmp_path: Path) -> None:
    calls: list[tuple[int, int | None]] = []
    merge_model(tiny_llama, [read_adapter(adapters / "lora")], tmp_path / "m", device="cpu",
                progress=lambda n=1, *, total=None: calls.append((n, total)))
    count = len(load_file(str(tiny_llama / "model.safetensors")))
    assert calls[0] == (0, count) and sum(n for n, _ in calls) == count and all(t is None for _, t in calls[1:])
