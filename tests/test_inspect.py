"""`loratools inspect`: every figure agrees with a dense float64 SVD of ΔW."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loratools import Adapter, AdapterConfig, Module, read_adapter, write_adapter
from loratools.inspection import LayerRow, inspect_adapter


def dense_reference(m: Module) -> dict[str, float | int | list[float]]:
    """Every figure computed the slow, independent way: form ΔW in float64, take its full SVD."""
    dW = m.delta(dtype=torch.float64)
    mat = dW.T if (m.kind == "embedding" or m.fan_in_fan_out) else dW.reshape(dW.shape[0], -1)
    s = torch.linalg.svdvals(mat)[: m.rank]
    s = torch.cat([s, s.new_zeros(m.rank - s.numel())])
    energy = (s**2).cumsum(0) / (s**2).sum() if float(s.sum()) else None
    p = s / s.sum() if float(s.sum()) else None
    nz = p[p > 0] if p is not None else None
    return {
        "singular_values": s.tolist(),
        "stable_rank": float((s**2).sum() / s[0] ** 2) if s.numel() and float(s[0]) else 0.0,
        "effective_rank": math.exp(float(-(nz * nz.log()).sum())) if nz is not None else 0.0,
        "energy_rank_90": int((energy < 0.9 * (1 - 1e-12)).sum()) + 1 if energy is not None else 0,
        "energy_rank_99": int((energy < 0.99 * (1 - 1e-12)).sum()) + 1 if energy is not None else 0,
    }


def assert_layer_matches(layer: LayerRow, m: Module) -> None:
    ref = dense_reference(m)
    s_ours, s_ref = torch.tensor(layer.singular_values), torch.tensor(ref["singular_values"])
    top = float(s_ref[0]) if s_ref.numel() else 0.0
    assert len(layer.singular_values) == m.rank
    # relative to σ₁: tiny trailing values are exactly where a relative-per-value test is meaningless
    diff = float((s_ours - s_ref).abs().max()) if s_ref.numel() else 0.0
    assert diff <= 1e-5 * max(top, 1e-30)
    for key in ("stable_rank", "effective_rank"):
        assert getattr(layer.spectrum, key) == pytest.approx(ref[key], rel=1e-5, abs=1e-9), key
    for key in ("energy_rank_90", "energy_rank_99"):
        assert getattr(layer.spectrum, key) == ref[key], key


@pytest.mark.parametrize("name", ["lora", "rslora", "adalora", "lora.safetensors"])
def test_fixture_adapters_match_dense_svd(name, adapters):
    adapter = read_adapter(adapters / name)
    report = inspect_adapter(adapter)
    assert report.modules == len(adapter.modules)
    assert report.parameters == sum(m.A.numel() + m.B.numel() + (m.E.numel() if m.E is not None else 0)
                                    for m in adapter.modules.values())
    for layer in report.layers:
        assert_layer_matches(layer, adapter.modules[layer.name])


@settings(max_examples=40, deadline=None)
@given(
    out=st.integers(1, 40), inp=st.integers(1, 40), r=st.integers(1, 12),
    kind=st.sampled_from(["linear", "fifo", "conv", "embedding", "adalora"]),
    seed=st.integers(0, 2**16), decay=st.floats(0.0, 3.0),
)
def test_spectrum_matches_dense_svd_property(out, inp, r, kind, seed, decay):
    g = torch.Generator().manual_seed(seed)
    E = None
    if kind == "conv":
        A, B = torch.randn(r, inp, 3, 3, generator=g), torch.randn(out, r, 1, 1, generator=g)
    else:
        A, B = torch.randn(r, inp, generator=g), torch.randn(out, r, generator=g)
        # a decaying spectrum, as trained adapters have
        A = A * torch.tensor([(i + 1) ** -decay for i in range(r)]).unsqueeze(1)
    if kind == "adalora":
        E = torch.randn(r, 1, generator=g)
    m = Module(A=A, B=B, E=E, alpha=2.0 * r, scale=2.0, fan_in_fan_out=kind == "fifo",
               kind="conv" if kind == "conv" else "embedding" if kind == "embedding" else "linear")
    assert_layer_matches(inspect_adapter(Adapter({"m": m})).layers[0], m)


def test_json_output_has_the_documented_fields(cli, adapters):
    res = cli("inspect", adapters / "adalora", "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["format"] == "peft" and data["method"] == "adalora" and data["modules"] == 12
    for key in ("name", "shape", "rank", "alpha", "scale", "singular_values", "stable_rank", "effective_rank",
                "energy_rank_90", "energy_rank_99"):
        assert key in data["layers"][0]
    zero = [l for l in data["layers"] if l["rank"] == 0]
    assert zero and zero[0]["singular_values"] == [] and zero[0]["stable_rank"] == 0


#: the keys of `inspect --json` (top level, a layer, a totals row), as they were before the report was typed
TOP_KEYS = ["format", "method", "dora", "base_model", "use_rslora", "init_r", "fingerprint", "modules", "parameters",
            "rank_min", "rank_max", "rank_total", "saved_tensors", "recommended_rank", "by_layer", "by_type", "layers"]
LAYER_KEYS = ["name", "kind", "shape", "rank", "alpha", "scale", "parameters", "singular_values", "fro_norm",
              "sigma_max", "numerical_rank", "stable_rank", "effective_rank", "energy_rank_90", "energy_rank_99"]


def test_report_is_typed_and_its_json_keeps_the_keys(cli, adapters):
    from loratools.inspect_job import inspect_file

    report = inspect_file(adapters / "rslora")
    assert report == inspect_adapter(read_adapter(adapters / "rslora"), format="peft")  # the CLI's one call
    data = report.to_json()
    assert list(data) == TOP_KEYS and list(data["layers"][0]) == LAYER_KEYS
    assert list(data["recommended_rank"]) == ["energy_90", "energy_99"]
    assert list(data["by_layer"][0]) == ["layer", "modules", "parameters", "rank_total", "fro_norm"]
    assert list(data["by_type"][0]) == ["type", "modules", "parameters", "rank_total", "fro_norm"]
    assert isinstance(data["layers"][0]["shape"], list) and isinstance(data["saved_tensors"], list)
    res = cli("inspect", adapters / "rslora", "--json")
    assert res.returncode == 0 and json.loads(res.stdout) == json.loads(json.dumps(data))


def test_table_output_names_every_module(cli, adapters):
    res = cli("inspect", adapters / "rslora")
    assert res.returncode == 0, res.stderr
    adapter = read_adapter(adapters / "rslora")
    for name in adapter.modules:
        assert name in res.stdout
    assert "31,744 parameters" in res.stdout


def test_single_file_records_the_base_fingerprint(adapters, tmp_path):
    adapter = read_adapter(adapters / "lora")
    write_adapter(adapter, tmp_path / "a.safetensors", format="loratools")
    from loratools.io import read_safetensors_header

    _, meta = read_safetensors_header(tmp_path / "a.safetensors")
    fp = json.loads(meta["fingerprint"])
    assert fp["sha256"] == adapter.fingerprint.sha256
    assert fp["shapes"]["model.layers.0.self_attn.v_proj.weight"] == [64, 128]
    assert json.loads(meta["config"])["method"] == "lora" and meta["format_version"] == "1"


# --- totals, the rank recommendation and natural order (issue "The practitioner's workflow", 6) -----------------

def _twelve_layer_adapter() -> Adapter:
    g = torch.Generator().manual_seed(3)
    mods = {}
    for i in range(12):
        for t, r in (("q_proj", 4), ("v_proj", 2)):
            mods[f"model.layers.{i}.self_attn.{t}"] = Module(A=torch.randn(r, 16, generator=g),
                                                             B=torch.randn(8, r, generator=g), alpha=r, scale=1.0)
    return Adapter(mods)


def test_layers_are_in_natural_order_and_totals_add_up():
    from loratools.inspection import natural_key

    adapter = _twelve_layer_adapter()
    report = inspect_adapter(adapter)
    names = [l.name for l in report.layers]
    blocks = [int(n.split(".")[2]) for n in names]
    assert blocks == sorted(blocks) and blocks[:4] == [0, 0, 1, 1] and blocks[-1] == 11
    assert [r.group for r in report.by_layer] == [str(i) for i in range(12)]
    assert sorted(["a.10", "a.9", "a.1"], key=natural_key) == ["a.1", "a.9", "a.10"]
    for row in report.by_layer:
        mods = [m for n, m in adapter.items() if n.split(".")[2] == row.group]
        dense = sum(float(m.delta(dtype=torch.float64).pow(2).sum()) for m in mods) ** 0.5
        assert row.modules == 2 and row.rank_total == 6
        assert row.parameters == sum(m.parameters for m in mods)
        assert row.fro_norm == pytest.approx(dense, rel=1e-5)
    by_type = {r.group: r for r in report.by_type}
    assert set(by_type) == {"q_proj", "v_proj"} and by_type["q_proj"].rank_total == 48


def test_recommended_rank_keeps_the_adapter_energy_by_dense_svd():
    adapter = _twelve_layer_adapter()
    report = inspect_adapter(adapter)
    # independent reference: dense float64 SVD of every ΔW, energy kept at a common rank k
    spectra = [torch.linalg.svdvals(m.delta(dtype=torch.float64)) for m in adapter.modules.values()]
    total = sum(float((s**2).sum()) for s in spectra)

    def kept(k: int) -> float:
        return sum(float((s[:k] ** 2).sum()) for s in spectra) / total

    for frac, key in ((0.9, "energy_90"), (0.99, "energy_99")):
        k = getattr(report.recommended_rank, key)
        assert kept(k) >= frac and (k == 1 or kept(k - 1) < frac)


def test_table_prints_totals_and_recommendation(cli, adapters):
    res = cli("inspect", adapters / "adalora")
    assert res.returncode == 0, res.stderr
    assert "recommended rank:" in res.stdout and "down_proj" in res.stdout and "Σ rank" in res.stdout


def test_resize_table_is_in_natural_order(cli, tmp_path):
    write_adapter(_twelve_layer_adapter(), tmp_path / "a", format="peft")
    res = cli("resize", tmp_path / "a", "-o", tmp_path / "b", "--rank", "1")
    assert res.returncode == 0, res.stderr
    rows = [line for line in res.stdout.splitlines() if "model.layers." in line]
    blocks = [int(line.split("model.layers.")[1].split(".")[0]) for line in rows]
    assert blocks == sorted(blocks) and len(blocks) == 24
