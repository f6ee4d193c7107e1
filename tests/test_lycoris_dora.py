"""LyCORIS DoRA (``dora_scale``) files on LoCon, read exactly and checked against LyCORIS 4.1.3 itself.

peft 0.21.2's DoRA (``tuners/lora/dora.py``) is W′ = V · m / ‖V‖_row, V = W0 + s·BA, no ε. LyCORIS 4.1.3
(``functional/general.py`` ``_weight_decompose``) divides by ‖V‖ + ε (ε = finfo(dora_scale.dtype).eps, 2⁻²³ for the
float32 ``dora_scale`` its modules hold) and, with ``wd_on_out=False``, normalises input columns instead. The first
tests pin both facts on LyCORIS's own modules (a change in LyCORIS fails them); the output-row kind is then read as a
DoRA module with ``dora_eps`` 2⁻²³ and merged as LyCORIS merges it, the input-column kind is refused by name, and
writers whose DoRA has no ε refuse it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import run_cli

from test_lycoris import _base, _network, lycoris  # the seeded tiny model with a LyCORIS network on every layer

from safetensors.torch import load_file, save_file

from loratools.adapter import Module
from loratools.dora import dora_factor
from loratools.errors import InvalidOptionError, NotAnAdapterError  # noqa: E402
from loratools.formats import load_base, read_adapter  # noqa: E402
from loratools.formats.single import read_single, write_single

EPS32 = torch.finfo(torch.float32).eps


def _dora(wd_on_output: bool) -> tuple[torch.nn.Module, object]:
    return _network("locon", {}, dora_wd=True, wd_on_output=wd_on_output)


def _lycoris_merged(lm: object) -> torch.Tensor:
    with torch.no_grad():
        return lm.get_merged_weight(1)[0]  # type: ignore[attr-defined]


def test_lycoris_dora_divides_output_row_norms_plus_float32_eps() -> None:
    """LyCORIS's merged weight is V · m / (‖V‖_row + 2⁻²³); peft's rule (no ε) misses it by more than 1e-6 on a
    row whose norm is small, which is why such a file is not read as peft's DoRA."""
    _, net = _dora(True)
    lm = next(m for m in net.loras if m.lora_name == "lora_te_q_proj")  # type: ignore[attr-defined]
    with torch.no_grad():
        lm.org_module[0].weight[0].mul_(1e-3)  # one row of W0 with a small norm
        lm.lora_up.weight[0].mul_(1e-3)
        w0 = lm.org_module[0].weight.double()
        v = w0 + lm.get_diff_weight(1)[0].double()
        m = lm.dora_scale.double()
    assert lm.dora_scale.dtype == torch.float32 and tuple(lm.dora_scale.shape) == (8, 1)
    got = _lycoris_merged(lm).double()
    norm = v.norm(dim=1, keepdim=True)
    lycoris_rule, peft_rule = v * m / (norm + EPS32), v * m / norm
    assert torch.linalg.norm(got - lycoris_rule) <= 1e-6 * torch.linalg.norm(lycoris_rule)
    gap = (peft_rule[0] - lycoris_rule[0]).norm() / lycoris_rule[0].norm()
    assert gap > 1e-6, float(gap)


def test_lycoris_dora_without_wd_on_out_normalises_input_columns() -> None:
    _, net = _dora(False)
    lm = next(m for m in net.loras if m.lora_name == "lora_te_q_proj")  # type: ignore[attr-defined]
    assert tuple(lm.dora_scale.shape) == (1, 12)
    with torch.no_grad():
        v = lm.org_module[0].weight.double() + lm.get_diff_weight(1)[0].double()
        want = v * lm.dora_scale.double() / (v.norm(dim=0, keepdim=True) + EPS32)
    got = _lycoris_merged(lm).double()
    assert torch.linalg.norm(got - want) <= 1e-6 * torch.linalg.norm(want)


def _small_row_file(tmp_path: Path) -> tuple[Path, Path, object]:
    """A LoCon DoRA file (wd_on_out) on every layer of the tiny model, q_proj's row 0 of V with a norm of ~1e-3
    (where ε = 2⁻²³ moves the row by ~1e-4 relative), and its base; LyCORIS's network comes back too."""
    model, net = _dora(True)
    lm = next(m for m in net.loras if m.lora_name == "lora_te_q_proj")  # type: ignore[attr-defined]
    with torch.no_grad():
        lm.org_module[0].weight[0].mul_(1e-3)
        lm.lora_up.weight[0].mul_(1e-3)
    path = tmp_path / "dora.safetensors"
    net.save_weights(str(path), torch.float32, None)  # type: ignore[attr-defined]
    return path, _base(tmp_path, model), net


def _lycoris_weights(net: object) -> dict[str, torch.Tensor]:
    """kohya key → LyCORIS's own merged weight (``get_merged_weight``: what its forward applies), float64."""
    return {lm.lora_name: _lycoris_merged(lm).double() for lm in net.loras}  # type: ignore[attr-defined]


def test_lycoris_dora_file_reads_as_dora_with_float32_eps(tmp_path: Path) -> None:
    path, base, _ = _small_row_file(tmp_path)
    tensors = load_file(path)
    adapter = read_adapter(path, base=load_base(base))
    assert sorted(adapter.modules) == ["conv", "conv_big", "fc", "point", "q_proj", "wide"]
    for name, m in adapter.items():
        assert m.is_dora and m.dora_eps == EPS32 == 2.0 ** -23
        assert torch.equal(m.magnitude, tensors[f"lora_te_{name}.dora_scale"].reshape(-1))  # type: ignore[arg-type]
    assert adapter.modules["conv"].kind == "conv"


def test_lycoris_loader_holds_dora_scale_in_float32_whatever_the_file_stores() -> None:
    """Why ε is 2⁻²³ for a 16-bit dora_scale too: LyCORIS 4.1.3's loader (``make_module_from_state_dict``) copies it
    into the float32 parameter ``LoConModule.__init__`` makes, and ``_weight_decompose`` takes ε from that dtype."""
    torch.manual_seed(0)
    org = torch.nn.Linear(12, 8)
    with torch.no_grad():  # as create_network_from_weights calls it
        lm = lycoris.modules.locon.LoConModule.make_module_from_state_dict(
            "lora_te_q_proj", org, torch.randn(8, 2), torch.randn(2, 12), None, torch.tensor(3.0),
            torch.rand(8, 1).half())
    assert lm.dora_scale.dtype == torch.float32 and lm.wd_on_out


def test_merge_equals_lycoris_merged_weight_linear_and_conv(tmp_path: Path) -> None:
    """loratools merge = LyCORIS's own merged weight, V · m / (‖V‖ + ε), on every linear and conv module."""
    path, base, net = _small_row_file(tmp_path)
    done = run_cli("merge", base, path, "-o", tmp_path / "merged.safetensors", "--precision", "float64")
    assert done.returncode == 0, done.stderr
    merged = load_file(tmp_path / "merged.safetensors")
    for key, want in _lycoris_weights(net).items():
        got = merged[key[len("lora_te_"):] + ".weight"].double()
        err = float((got - want).norm() / want.norm())
        assert err <= 1e-6, (key, err)
    q = merged["q_proj.weight"].double()
    lm = next(m for m in net.loras if m.lora_name == "lora_te_q_proj")  # type: ignore[attr-defined]
    x = torch.randn(5, 12)
    with torch.no_grad():  # LyCORIS's forward (the network is applied to the model) gives the same output
        y = lm(x).double()
    torch.testing.assert_close(y, x.double() @ q.T + lm.org_module[0].bias.double(), rtol=1e-5, atol=1e-5)


def test_small_norm_row_follows_lycoris_eps_not_peft(tmp_path: Path) -> None:
    """On a row of V with norm ~1.6e-3 the two rules differ by ~7e-5 (relative): the merge follows LyCORIS's ε."""
    path, base, net = _small_row_file(tmp_path)
    assert run_cli("merge", base, path, "-o", tmp_path / "m.safetensors", "--precision", "float64").returncode == 0
    row = load_file(tmp_path / "m.safetensors")["q_proj.weight"][0].double()
    lm = next(m for m in net.loras if m.lora_name == "lora_te_q_proj")  # type: ignore[attr-defined]
    with torch.no_grad():
        v = (lm.org_module[0].weight.double() + lm.get_diff_weight(1)[0].double())[0]
        m = float(lm.dora_scale[0])
    assert float(v.norm()) < 1e-2
    lycoris_rule, peft_rule = v * m / (v.norm() + EPS32), v * m / v.norm()
    assert float((row - lycoris_rule).norm() / lycoris_rule.norm()) <= 1e-6
    assert float((row - peft_rule).norm() / peft_rule.norm()) > 3e-5


@pytest.mark.parametrize("to", ["peft", "mlx"])
def test_convert_to_a_format_without_eps_is_refused_by_name(tmp_path: Path, to: str) -> None:
    path, base, _ = _small_row_file(tmp_path)
    out = tmp_path / "out"
    done = run_cli("convert", path, "-o", out, "--to", to, "--base", base)
    assert done.returncode == 2 and "LyCORIS DoRA (ε = 1.19e-07)" in done.stderr and "has no ε" in done.stderr
    assert "--as-lora --base BASE" in done.stderr and "\n" not in done.stderr.strip()
    assert not out.exists()


def test_as_lora_flattens_lycoris_update(tmp_path: Path) -> None:
    """``convert --as-lora --base`` at full rank: each module's ΔW is LyCORIS's W′ − W0, row 0 of q_proj (where ε
    matters) included."""
    path, base, net = _small_row_file(tmp_path)
    out = tmp_path / "lora"
    done = run_cli("convert", path, "-o", out, "--to", "peft", "--base", base, "--as-lora", "--rank", "100")
    assert done.returncode == 0, done.stderr
    lora = read_adapter(out)
    assert not lora.is_dora
    w0 = load_file(base)
    wants = _lycoris_weights(net)
    for name, m in lora.items():
        D = wants["lora_te_" + name] - w0[name + ".weight"].double()
        got = m.delta(dtype=torch.float64)
        assert float((got - D).norm() / D.norm()) <= 1e-5, name
    lm = next(m for m in net.loras if m.lora_name == "lora_te_q_proj")  # type: ignore[attr-defined]
    with torch.no_grad():
        v = (lm.org_module[0].weight.double() + lm.get_diff_weight(1)[0].double())[0]
        m0 = float(lm.dora_scale[0])
    row = lora.modules["q_proj"].delta(dtype=torch.float64)[0] + w0["q_proj.weight"][0].double()
    lycoris_rule, peft_rule = v * m0 / (v.norm() + EPS32), v * m0 / v.norm()
    assert float((row - lycoris_rule).norm() / lycoris_rule.norm()) < 1e-5
    assert float((row - peft_rule).norm() / peft_rule.norm()) > 3e-5


def test_loratools_file_keeps_the_eps(tmp_path: Path) -> None:
    path, base, _ = _small_row_file(tmp_path)
    adapter = read_adapter(path, base=load_base(base))
    write_single(adapter, tmp_path / "ad.safetensors")
    back = read_single(tmp_path / "ad.safetensors")
    for name, m in adapter.items():
        assert back.modules[name].dora_eps == m.dora_eps == EPS32
        assert torch.equal(back.modules[name].magnitude, m.magnitude)  # type: ignore[arg-type]


def test_eps_zero_is_peft_rule_bit_for_bit_and_eps_is_checked() -> None:
    m = Module(A=torch.ones(1, 2), B=torch.ones(3, 1), alpha=1, scale=1.0, magnitude=torch.tensor([1.0, 2.0, 3.0]))
    norms = torch.tensor([0.3, 1e-3, 7.0])
    assert torch.equal(dora_factor(m, norms), m.magnitude / norms)  # type: ignore[operator]
    lyco = m.with_factors(dora_eps=EPS32)
    assert torch.equal(dora_factor(lyco, norms), m.magnitude / (norms + EPS32))  # type: ignore[operator]
    for bad in (-1e-9, float("nan"), float("inf")):
        with pytest.raises(InvalidOptionError, match="dora_eps"):
            m.with_factors(dora_eps=bad)


def test_lycoris_dora_input_columns_file_is_refused_by_name(tmp_path: Path) -> None:
    _, net = _dora(False)
    path = tmp_path / "dora.safetensors"
    net.save_weights(str(path), torch.float32, None)  # type: ignore[attr-defined]
    with pytest.raises(NotAnAdapterError) as e:
        read_adapter(path)
    message = str(e.value)
    assert "lora_te_" in message and "\n" not in message and "loratools extract" in message
    for w in ("wd_on_out=False", "input column", "loads only the output-row kind"):
        assert w in message, w


def test_a_dora_scale_of_the_wrong_shape_is_a_corrupt_file(tmp_path: Path) -> None:
    path, _, _ = _small_row_file(tmp_path)
    tensors = load_file(path)
    tensors["lora_te_q_proj.dora_scale"] = torch.ones(7, 1)
    save_file(tensors, tmp_path / "bad.safetensors")
    done = run_cli("inspect", tmp_path / "bad.safetensors")
    assert done.returncode == 2 and "lora_te_q_proj" in done.stderr and "dora_scale (7, 1)" in done.stderr


def test_lycoris_dora_on_a_flux_module_is_refused_by_name(tmp_path: Path) -> None:
    """Flux.1's fused projections are read split (diffusers' names): a magnitude would have to be split alike."""
    from test_kohya_flux import _SINGLE, _kohya_flux
    from loratools.formats import read_with_base
    path = _kohya_flux(tmp_path / "flux.safetensors", _SINGLE)
    tensors = load_file(path)
    key = "lora_unet_single_blocks_0_modulation_lin"
    tensors[f"{key}.dora_scale"] = torch.rand(tensors[f"{key}.lora_up.weight"].shape[0], 1)
    save_file(tensors, tmp_path / "dora.safetensors", metadata={"ss_network_module": "networks.lora_flux"})
    with pytest.raises(NotAnAdapterError, match="LyCORIS DoRA \\(dora_scale\\) on Flux.1") as e:
        read_with_base(tmp_path / "dora.safetensors", component="transformer")
    assert key in str(e.value)


def test_merge_verify_and_unmerge_with_the_record_keep_the_eps(tmp_path: Path) -> None:
    """The record's row norms and ε give W0 back from W′ = V · m / (‖V‖ + ε) (float32, to ~1e-6), and verify agrees;
    un-merging a small-norm row with peft's rule would miss it by far more."""
    from loratools.merge.jobs import merge_model, unmerge_model, verify_merge
    path, base, _ = _small_row_file(tmp_path)
    ad = read_adapter(path, base=load_base(base))
    rec = tmp_path / "rec.safetensors"
    merge_model(base, [ad], tmp_path / "m.safetensors", device="cpu", record=rec, precision="float64")
    assert verify_merge(base, [ad], tmp_path / "m.safetensors", device="cpu").ok
    unmerge_model(tmp_path / "m.safetensors", [ad], tmp_path / "u.safetensors", device="cpu", record=rec,
                  precision="float64")
    w0, back = load_file(base), load_file(tmp_path / "u.safetensors")
    for k, v in w0.items():
        assert float((back[k].double() - v.double()).norm()) <= 1e-6 * float(v.double().norm()) + 1e-12, k
    row_err = float((back["q_proj.weight"][0].double() - w0["q_proj.weight"][0].double()).norm())
    assert row_err <= 1e-6 * float(w0["q_proj.weight"][0].double().norm()), row_err


def test_dora_linear_forward_follows_its_eps() -> None:
    """DoRALinear's forward uses the same rule (:func:`loratools.dora.dora_factor`): with ε it is W′ of merged_weight,
    and on a small-norm row differs from the ε-free layer."""
    from loratools.dora import merged_weight
    from loratools.nn import DoRALinear
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 8).double()
    with torch.no_grad():
        base.weight[0].mul_(1e-4)
    layer = DoRALinear(base, rank=2, alpha=3.0).double()
    with torch.no_grad():
        layer.lora_A.normal_(0.0, 0.5)
        layer.lora_B.normal_(0.0, 1e-4)
        layer.lora_magnitude_vector.normal_(0.0, 0.5)
    layer.eval()
    x = torch.randn(4, 12, dtype=torch.float64)
    with torch.no_grad():
        plain = layer(x)
        layer.dora_eps = EPS32
        y = layer(x)
        w = merged_weight(base.weight.detach(), layer.module(detach=True), precision=torch.float64)
    assert layer.module().dora_eps == EPS32
    torch.testing.assert_close(y, x @ w.T + base.bias, rtol=1e-6, atol=1e-6)  # its norms are float32
    assert float((y - plain)[:, 0].abs().max()) > 1e-5  # ~1e-4: ε against a row norm of ~1e-4
    assert float((y - plain)[:, 1:].abs().max()) < 1e-5


def test_locon_tucker_with_dora_merges_as_lycoris(tmp_path: Path) -> None:
    """``use_tucker`` + DoRA: the ``lora_mid`` core folded into lora_down, then the same DoRA rule as LyCORIS."""
    model, net = _network("locon", {}, use_tucker=True, dora_wd=True)
    path = tmp_path / "tucker_dora.safetensors"
    net.save_weights(str(path), torch.float32, None)  # type: ignore[attr-defined]
    assert "lora_te_conv.lora_mid.weight" in load_file(path) and "lora_te_conv.dora_scale" in load_file(path)
    base = _base(tmp_path, model)
    done = run_cli("merge", base, path, "-o", tmp_path / "merged.safetensors", "--precision", "float64")
    assert done.returncode == 0, done.stderr
    merged = load_file(tmp_path / "merged.safetensors")
    for key, want in _lycoris_weights(net).items():
        got = merged[key[len("lora_te_"):] + ".weight"].double()
        assert float((got - want).norm() / want.norm()) <= 1e-6, key


def test_a_model_loaded_with_lycoris_dora_computes_with_its_eps_and_gives_it_back() -> None:
    """eval and train load adapters into a model (loratools.nn.inject): the layer keeps the module's ε, so its
    forward is x·W′ᵀ of the merge, and the adapter read back from the model still carries it."""
    from loratools.adapter import Adapter
    from loratools.config import AdapterConfig
    from loratools.dora import merged_weight
    from loratools.nn.inject import adapter_state, load_adapter

    torch.manual_seed(1)
    model = torch.nn.Sequential()
    model.add_module("q_proj", torch.nn.Linear(12, 8, bias=False).double())
    with torch.no_grad():
        model.q_proj.weight[0].mul_(1e-4)
    g = torch.Generator().manual_seed(2)
    m = Module(A=torch.randn(2, 12, generator=g), B=torch.randn(8, 2, generator=g) * 1e-4, alpha=2.0, scale=1.0,
               magnitude=torch.rand(8, generator=g) + 0.5, dora_eps=EPS32)
    load_adapter(model, Adapter({"q_proj": m}, AdapterConfig(method="lora", target_modules=["q_proj"])))
    x = torch.randn(3, 12, dtype=torch.float64)
    want = x @ merged_weight(model.q_proj.base.weight.detach(), m, precision=torch.float64).T
    with torch.no_grad():
        got = model.eval()(x)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
    assert adapter_state(model).modules["q_proj"].dora_eps == EPS32
