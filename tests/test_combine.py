"""combine: Σ wᵢΔWᵢ into one adapter, checked against peft (its ΔW, its merge, its `cat` combination)
and against dense float64 sums and SVDs."""

from __future__ import annotations

import json
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import loratools as lt
from loratools.adapter import Adapter, Module
from loratools.compress.combine import combine_adapters, dare_merge, ties_merge
from loratools.config import AdapterConfig
from loratools.errors import InvalidOptionError, WrongBaseError
from loratools.formats import read_adapter, write_adapter
from loratools.io import ModelReader
from loratools.linalg import RankRule, choose_rank

from conftest import ADAPTERS, TINY_LLAMA
from helpers import peft_deltas

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TOL = 1e-6


def _dense_sum(terms: list[tuple[dict[str, torch.Tensor], float]]) -> dict[str, torch.Tensor]:
    """Σ wᵢΔWᵢ in float64 from per-input {module: ΔW} dicts (modules missing from an input add nothing)."""
    out: dict[str, torch.Tensor] = {}
    for deltas, w in terms:
        for name, d in deltas.items():
            out[name] = out.get(name, torch.zeros_like(d, dtype=torch.float64)) + w * d.double()
    return out


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max()) / max(1.0, float(b.abs().max()))


# --- exact combine: through peft and through merge, mixed formats, negative weights ----------------------------------

@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> dict:
    """Inputs in five formats with weights of both signs, and the float64 reference Σ wᵢΔWᵢ from peft's own ΔW."""
    base, ads = TINY_LLAMA, ADAPTERS
    tmp = tmp_path_factory.mktemp("mixed")
    lt.convert_file(ads / "rslora", tmp / "rslora-kohya.safetensors", to="kohya")
    inputs = [(ads / "lora", 1.0, "lora"), (tmp / "rslora-kohya.safetensors", -0.5, "rslora"),
              (ads / "adalora", 0.75, "adalora"), (ads / "lora.safetensors", -0.25, "lora")]
    try:
        import gguf  # noqa: F401

        lt.convert_file(ads / "rslora", tmp / "rslora.gguf", to="gguf", base=base)
        inputs.append((tmp / "rslora.gguf", 0.3, "rslora"))
    except ImportError:
        pass
    peft_d = {src: peft_deltas(base, ads / src)[0] for src in ("lora", "rslora", "adalora")}
    ref = _dense_sum([(peft_d[src], w) for _, w, src in inputs])
    formats = [lt.detect_format(p) for p, _, _ in inputs]
    res = combine_adapters([(read_adapter(p), w) for p, w, _ in inputs], device="cpu")
    out = tmp / "combined"
    write_adapter(res.adapter, out)
    return {"base": base, "inputs": inputs, "formats": formats, "ref": ref, "res": res, "out": out, "tmp": tmp}


def test_exact_combine_reads_every_format_and_is_exact(mixed):
    assert {"peft", "kohya", "loratools"} <= set(mixed["formats"])
    res = mixed["res"]
    assert res.exact and all(layer.rel_error == 0.0 for layer in res.layers)
    assert set(res.adapter.modules) == {n for n, d in mixed["ref"].items() if float(d.abs().max()) > 0}
    for layer in res.layers:  # the exact rank is Σ rᵢ of the contributing inputs
        assert layer.rank == sum(r or 0 for r in layer.input_ranks)
    for name, d in mixed["ref"].items():
        if name in res.adapter.modules:
            assert _max_rel(res.adapter.delta(name), d) < TOL


def test_exact_combine_loads_in_peft_with_the_weighted_sum(mixed):
    deltas, model = peft_deltas(mixed["base"], mixed["out"])
    assert set(deltas) == set(mixed["res"].adapter.modules)
    for name, d in deltas.items():
        assert _max_rel(d, mixed["ref"][name]) < TOL
    merged = model.merge_and_unload().state_dict()
    with ModelReader(mixed["base"]) as base:
        for name, d in mixed["ref"].items():
            key = f"{name}.weight"
            assert _max_rel(merged[key], base.get(key).double() + d) < TOL


def test_exact_combine_through_merge_equals_base_plus_weighted_sum(mixed):
    out = mixed["tmp"] / "merged"
    lt.merge_model(mixed["base"], [(read_adapter(mixed["out"]), 1.0)], out, device="cpu")
    with ModelReader(mixed["base"]) as base, ModelReader(out) as merged:
        changed = 0
        for key in base.keys():
            name = key[: -len(".weight")]
            want = base.get(key).double() + mixed["ref"].get(name, 0.0)
            assert _max_rel(merged.get(key), want) < TOL, key
            changed += name in mixed["ref"]
        assert changed == len(mixed["ref"]) > 0


def test_peft_cat_combination_agrees(tiny_llama, adapters):
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    pm = PeftModel.from_pretrained(model, adapters / "lora", adapter_name="a")
    pm.load_adapter(adapters / "rslora", adapter_name="b")
    pm.add_weighted_adapter(["a", "b"], [1.0, -0.5], "cat", combination_type="cat")
    ours = combine_adapters([(read_adapter(adapters / "lora"), 1.0), (read_adapter(adapters / "rslora"), -0.5)],
                            device="cpu").adapter
    seen = 0
    for name, mod in pm.base_model.model.named_modules():
        if isinstance(mod, LoraLayer) and "cat" in mod.lora_A:
            assert _max_rel(ours.delta(name), mod.get_delta_weight("cat").detach()) < TOL, name
            seen += 1
    assert seen == len(ours.modules) == 28


# --- truncation: the Eckart–Young optimum from the factors ------------------------------------------------------------

def _optimum(T: torch.Tensor, k: int) -> float:
    s = torch.linalg.svdvals(T)
    return float(s[k:].square().sum().sqrt()) / float(s.square().sum().sqrt())


@pytest.mark.parametrize("k", [1, 3, 6])
def test_truncated_combine_is_the_dense_float64_optimum(adapters, k):
    ins = [(read_adapter(adapters / "lora"), 1.0), (read_adapter(adapters / "rslora"), -0.5),
           (read_adapter(adapters / "adalora"), 2.0)]
    ref = _dense_sum([({n: m.delta(dtype=torch.float64) for n, m in a.items()}, w) for a, w in ins])
    res = combine_adapters(ins, rule=RankRule(rank=k), device="cpu")
    assert not res.exact
    for layer in res.layers:
        T = ref[layer.name]
        if T.abs().max() == 0:
            continue
        got = res.adapter.modules[layer.name]
        assert got.rank == min(k, sum(r or 0 for r in layer.input_ranks))
        measured = float((got.delta(dtype=torch.float64) - T).norm() / T.norm())
        opt = _optimum(T, got.rank)
        assert measured <= 1.01 * opt + 1e-6, layer.name
        assert layer.rel_error == pytest.approx(opt, rel=1e-3, abs=1e-6)


def test_energy_rule_follows_the_dense_spectrum_of_the_sum(adapters):
    ins = [(read_adapter(adapters / "lora"), 1.0), (read_adapter(adapters / "rslora"), 0.7)]
    ref = _dense_sum([({n: m.delta(dtype=torch.float64) for n, m in a.items()}, w) for a, w in ins])
    res = combine_adapters(ins, rule=RankRule(energy=0.9), device="cpu")
    for name, T in ref.items():
        rank = sum(m.rank for a, _ in ins for n, m in a.items() if n == name)
        s = torch.linalg.svdvals(T)[:rank]
        assert res.adapter.modules[name].rank == choose_rank(s, energy=0.9)


def _module(m: int, n: int, r: int, seed: int, ada: bool) -> Module:
    g = torch.Generator().manual_seed(seed)
    E = torch.randn(r, 1, generator=g) if ada else None
    return Module(A=torch.randn(r, n, generator=g), B=torch.randn(m, r, generator=g), E=E, alpha=2.0 * r,
                  scale=float(torch.rand(1, generator=g)) + 0.1)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.lists(st.integers(0, 5), min_size=3, max_size=3), st.floats(-3, 3), st.booleans()),
                min_size=1, max_size=4),
       st.integers(1, 6), st.integers(0, 10_000))
def test_property_exact_and_optimal_over_random_ranks_and_weights(spec, k, seed):
    shapes = {"a": (7, 9), "b": (12, 5), "c": (6, 6)}
    ins = []
    for i, (ranks, w, ada) in enumerate(spec):  # rank 0: the input lacks the module
        mods = {name: _module(*shapes[name], r, seed + 10 * i + j, ada)
                for j, (name, r) in enumerate(zip(shapes, ranks)) if r > 0}
        cfg = AdapterConfig(method="adalora", init_r=5) if ada else AdapterConfig()
        ins.append((Adapter(mods, cfg), w))
    ref = _dense_sum([({n: m.delta(dtype=torch.float64) for n, m in a.items()}, w) for a, w in ins])
    exact = combine_adapters(ins, device="cpu")
    cut = combine_adapters(ins, rule=RankRule(rank=k), device="cpu")
    for name, T in ref.items():
        scale = max(1.0, float(T.abs().max()))
        if name in exact.adapter.modules:
            assert float((exact.adapter.delta(name, dtype=torch.float64) - T).abs().max()) <= 1e-5 * scale
        else:  # only zero weights touched it
            assert float(T.abs().max()) == 0.0
        if name in cut.adapter.modules and float(T.norm()) > 1e-9:
            got = cut.adapter.modules[name]
            assert got.rank <= k
            measured = float((got.delta(dtype=torch.float64) - T).norm() / T.norm())
            assert measured <= 1.01 * _optimum(T, got.rank) + 1e-5


def test_layouts_conv_embedding_fan_in_fan_out():
    g = torch.Generator().manual_seed(1)
    conv = [Module(A=torch.randn(r, 3, 3, 3, generator=g), B=torch.randn(6, r, 1, 1, generator=g), alpha=4, scale=0.5,
                   kind="conv") for r in (2, 3)]
    emb = [Module(A=torch.randn(r, 20, generator=g), B=torch.randn(8, r, generator=g), alpha=4, scale=2.0,
                  kind="embedding") for r in (2, 4)]
    fifo = [Module(A=torch.randn(r, 10, generator=g), B=torch.randn(7, r, generator=g), alpha=4, scale=1.5,
                   fan_in_fan_out=True) for r in (1, 2)]
    a = Adapter({"c": conv[0], "e": emb[0], "f": fifo[0]})
    b = Adapter({"c": conv[1], "e": emb[1], "f": fifo[1]})
    for rule in (None, RankRule(rank=2)):
        out = combine_adapters([(a, 0.5), (b, -2.0)], rule=rule, device="cpu").adapter
        for name in "cef":
            want = 0.5 * a.delta(name, dtype=torch.float64) - 2.0 * b.delta(name, dtype=torch.float64)
            got = out.delta(name, dtype=torch.float64)
            assert got.shape == want.shape == a.modules[name].weight_shape
            if rule is None:
                assert torch.allclose(got, want, atol=1e-5)
            else:
                M = want.reshape(want.shape[0], -1) if name == "c" else (want.T if name in "ef" else want)
                G = got.reshape(got.shape[0], -1) if name == "c" else (got.T if name in "ef" else got)
                assert float((G - M).norm() / M.norm()) <= 1.01 * _optimum(M, 2) + 1e-6


# --- ties / dare ------------------------------------------------------------------------------------------------------

def test_ties_merge_equals_peft_ties_with_equal_weights():
    from peft.utils.merge_utils import ties

    g = torch.Generator().manual_seed(0)
    tasks = [torch.randn(30, 20, generator=g) for _ in range(3)]
    for w in (1.0, 0.7):
        ref = ties(tasks, torch.tensor([w] * 3), 0.3, "total")
        assert torch.allclose(ties_merge([w * t for t in tasks], 0.3), ref, atol=1e-6)


def test_ties_negative_weight_votes_with_its_sign():
    # one entry: τ₁ = 1, τ₂ = −1·2 = −2 → the sum elects −, the mean of the agreeing entries is −2
    assert ties_merge([torch.tensor([1.0]), torch.tensor([-2.0])], 1.0).item() == -2.0


def test_dare_merge_drops_and_rescales_reproducibly():
    t = torch.randn(200, 100, generator=torch.Generator().manual_seed(0))
    one = dare_merge([t], 0.3, torch.Generator().manual_seed(5))
    kept = one != 0
    assert torch.equal(one[kept], t[kept] / 0.3)
    assert abs(float(kept.float().mean()) - 0.3) < 0.02
    assert torch.equal(one, dare_merge([t], 0.3, torch.Generator().manual_seed(5)))
    assert not torch.equal(one, dare_merge([t], 0.3, torch.Generator().manual_seed(6)))


def test_ties_combine_reports_its_distance_from_the_sum(adapters):
    from peft.utils.merge_utils import ties

    ins = [(read_adapter(adapters / "lora"), 1.0), (read_adapter(adapters / "lora.safetensors"), 1.0),
           (read_adapter(adapters / "adalora"), 1.0)]
    res = combine_adapters(ins, rule=RankRule(rank=4), method="ties", density=0.5, device="cpu")
    assert not res.exact and res.density == 0.5 and res.seed == 0
    for layer in res.layers:
        deltas = [a.modules[layer.name].delta() for a, _ in ins if layer.name in a.modules]
        target = ties(deltas, torch.ones(len(deltas)), 0.5, "total")
        total = sum(deltas)
        got = res.adapter.modules[layer.name].delta()
        assert got.shape == target.shape and res.adapter.modules[layer.name].rank <= 4
        assert layer.rel_error == pytest.approx(float((got - target).norm() / target.norm()), rel=1e-3, abs=1e-6)
        assert layer.sum_error == pytest.approx(float((got - total).norm() / total.norm()), rel=1e-3, abs=1e-6)
        assert layer.sum_error > 0.01


def test_dare_combine_is_seeded(adapters):
    ins = [(read_adapter(adapters / "lora"), 1.0), (read_adapter(adapters / "rslora"), -1.0)]
    a, b, c = (combine_adapters(ins, rule=RankRule(rank=4), method="dare", seed=s, device="cpu") for s in (1, 1, 2))
    name = "model.layers.0.self_attn.q_proj"
    assert torch.equal(a.adapter.delta(name), b.adapter.delta(name))
    assert not torch.equal(a.adapter.delta(name), c.adapter.delta(name))


# --- refusals ---------------------------------------------------------------------------------------------------------

def _tiny(shape=(4, 6), **cfg) -> Adapter:
    return Adapter({"q": Module(A=torch.ones(2, shape[1]), B=torch.ones(shape[0], 2), alpha=2, scale=1.0)},
                   AdapterConfig(**cfg))


@pytest.mark.parametrize("kwargs, inputs, match", [
    ({}, [], "`inputs` is empty"),
    ({}, [(_tiny(), float("nan"))], "`weights` must be finite"),
    ({}, [(_tiny(extra={"use_dora": True}), 1.0)], "DoRA"),
    ({}, [(Adapter(_tiny().modules, saved={"lm_head.weight": torch.ones(2, 2)}), 1.0)], "modules_to_save"),
    ({"method": "mean"}, [_tiny()], "`method` must be one of"),
    ({"method": "ties"}, [_tiny()], "give a rank rule"),
    ({"density": 0.5}, [_tiny()], "`density` applies"),
    ({"method": "dare", "rule": RankRule(rank=1), "density": 0.0}, [_tiny()], "`density` is the fraction"),
])
def test_bad_options_are_refused(kwargs, inputs, match):
    with pytest.raises(InvalidOptionError, match=match):
        combine_adapters(inputs, device="cpu", **kwargs)


def test_unmapped_kohya_names_are_not_mixed_with_module_names():
    flat = Adapter({"lora_te_q": _tiny().modules["q"]})
    with pytest.raises(InvalidOptionError, match="input 2 keeps kohya's flattened module names \\(lora_te_q\\)"):
        combine_adapters([_tiny(), flat], device="cpu")
    assert set(combine_adapters([flat, (flat, 2.0)], device="cpu").adapter.modules) == {"lora_te_q"}


def test_adapters_of_different_bases_are_refused():
    with pytest.raises(WrongBaseError, match="input 1 adapts q as a linear weight of shape \\(4, 6\\) but input 2"):
        combine_adapters([_tiny(), _tiny((5, 6))], device="cpu")


# --- the command ------------------------------------------------------------------------------------------------------

def test_cli_json_report_and_output(adapters, tmp_path, cli):
    out = tmp_path / "c.safetensors"
    proc = cli("combine", adapters / "lora", adapters / "rslora", "--weight", "1", "--weight", "-0.5", "-o", out,
               "--rank", "4", "--format", "loratools", "--json")
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    assert rep["weights"] == [1.0, -0.5] and rep["rule"] == "rank 4" and rep["exact"] is False
    assert rep["layers"][0]["input_ranks"] == [8, 12]
    written = read_adapter(out)
    assert written.parameters == rep["parameters"] and all(m.rank <= 4 for m in written.modules.values())


def test_cli_refusals_write_nothing(adapters, tmp_path, cli):
    other = tmp_path / "other.safetensors"
    bad = Adapter({"model.layers.0.self_attn.q_proj": Module(A=torch.ones(2, 7), B=torch.ones(128, 2), alpha=2,
                                                              scale=1.0)})
    write_adapter(bad, other, format="loratools")
    for args, msg in (((adapters / "lora", other), "made for one base"),
                      ((adapters / "lora", adapters / "rslora", "--weight", "1"), "give one per adapter"),
                      ((adapters / "lora", "--method", "ties"), "rank rule")):
        proc = cli("combine", *args, "-o", tmp_path / "out")
        assert proc.returncode == 2 and msg in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert not (tmp_path / "out").exists()


def test_cli_reports_heldout_loss_of_base_and_of_base_plus_combined(adapters, tmp_path, cli):
    from helpers import peft_heldout_loss

    data = tmp_path / "heldout.txt"
    data.write_text(" ".join(f"the cat sat on mat number {i} and looked around." for i in range(40)))
    out = tmp_path / "both"
    proc = cli("combine", adapters / "lora", adapters / "rslora", "-o", out, "--base", TINY_LLAMA, "--data", data,
               "--json")
    assert proc.returncode == 0, proc.stderr
    held = json.loads(proc.stdout)["heldout_loss"]
    alone = peft_heldout_loss(TINY_LLAMA, None, data)
    assert held["before"] == pytest.approx(alone, rel=1e-4) and held["base"] == held["before"]
    assert held["after"] == pytest.approx(peft_heldout_loss(TINY_LLAMA, out, data), rel=1e-4)
    assert abs(held["after"] - held["before"]) > 1e-4  # the combined adapter changes the loss
    one = cli("combine", adapters / "lora", "-o", tmp_path / "bad", "--data", data)
    assert one.returncode == 2 and not (tmp_path / "bad").exists() and "--base" in one.stderr


def test_names_a_format_keeps_as_its_file_spells_them_are_not_mixed(monkeypatch):
    """The check asks the format registry (Format.name_hint), not one format: a new format with names of its own
    is refused in a mix the same way."""
    from loratools.formats import FORMATS, Format

    own = Format("odd", "a test format", ".odd", detect=lambda p: False, reader=lambda p, b: Adapter({}),
                 writer=lambda a, p, b: None, name_hint=lambda n: "odd's own name" if n.startswith("odd_") else None)
    monkeypatch.setitem(FORMATS, "odd", own)
    with pytest.raises(InvalidOptionError, match="input 1 keeps odd's flattened module names \\(odd_q\\)"):
        combine_adapters([Adapter({"odd_q": _tiny().modules["q"]}), _tiny()], device="cpu")


# --- the path-level job: combine_files -------------------------------------------------------------------------------

def test_combine_files_is_read_combine_write(adapters, tmp_path):
    from loratools.compress.combine import combine_files

    out = tmp_path / "both"
    res = combine_files([adapters / "lora", adapters / "rslora"], out, weights=[1.0, -0.5], rank=4)
    ref = combine_adapters([(read_adapter(adapters / "lora"), 1.0), (read_adapter(adapters / "rslora"), -0.5)],
                           rule=RankRule(rank=4), device="cpu")
    assert res.inputs == (str(adapters / "lora"), str(adapters / "rslora")) and res.output == str(out)
    assert res.rule == RankRule(rank=4) and not res.exact and res.heldout is None
    written = read_adapter(out)
    for name, m in ref.adapter.items():
        assert torch.allclose(written.modules[name].delta(), m.delta(), atol=1e-6)
    report = res.to_json()
    assert report["inputs"] == list(res.inputs) and report["rule"] == "rank 4" and report["format"] == "peft"


@pytest.mark.parametrize("bad, match", [
    (dict(weights=[1.0]), "1 `weights` for 2 adapters"),
    (dict(method="ties"), "rank rule"),
    (dict(max_rank=4), "exactly one"),
    (dict(data="heldout.txt"), "`base` and `data`"),
    (dict(format="nope"), "nope"),
])
def test_combine_files_writes_nothing_when_it_refuses(adapters, tmp_path, bad, match):
    from loratools.compress.combine import combine_files
    from loratools.errors import LoraToolsError

    with pytest.raises(LoraToolsError, match=match):
        combine_files([adapters / "lora", adapters / "rslora"], tmp_path / "out", **bad)
    assert list(tmp_path.iterdir()) == []
