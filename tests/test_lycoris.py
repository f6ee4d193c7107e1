"""LyCORIS LoHa and LoKr files read as exact LoRA, checked against LyCORIS 4.1.3 itself (the producer).

Files are made with LyCORIS's own API (``create_lycoris`` with a ``lora_te`` prefix, ``save_weights``)
on a seeded tiny model; each module's ΔW from loratools must equal what LyCORIS's forward adds
(``get_weight(shape) * scalar``, ``lycoris/modules/loha.py`` / ``lokr.py`` ``forward``), computed by
LyCORIS in float64.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import loratools as lt
from conftest import run_cli
from loratools.errors import NotAnAdapterError
from loratools.formats import load_base, read_adapter

lycoris = pytest.importorskip("lycoris", reason="lycoris-lora 4.1.3 (the producer) is not installed")

#: (algo, create_lycoris options); LoKr's layouts: w1 full + w2 factored, both full, both factored
CASES = {
    "loha": ("loha", {}),
    "lokr": ("lokr", {"factor": 4}),
    "lokr_full": ("lokr", {"factor": 4, "full_matrix": True}),
    "lokr_both": ("lokr", {"decompose_both": True}),
}


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(12, 8)
        self.fc = nn.Linear(16, 64)
        self.conv = nn.Conv2d(4, 6, 3)
        self.point = nn.Conv2d(8, 4, 1)
        self.wide = nn.Linear(100, 100)  # LoKr with factor -1: 10×10 sides, both factored with decompose_both
        self.conv_big = nn.Conv2d(16, 32, 3)  # LoKr factor 4: lokr_w2_b stores the kernel flattened


def _network(algo: str, opts: dict[str, object], seed: int = 0, **extra: object) -> tuple[Tiny, object]:
    torch.manual_seed(seed)
    model = Tiny()
    lycoris.LycorisNetwork.apply_preset({"lora_prefix": "lora_te", "target_name": [".*"]})
    try:
        net = lycoris.create_lycoris(model, 1.0, linear_dim=2, linear_alpha=3.0, conv_dim=2, conv_alpha=5.0,
                                     algo=algo, **opts, **extra)
    finally:
        lycoris.LycorisNetwork.apply_preset({"lora_prefix": "lycoris", "target_name": []})
    net.apply_to()
    with torch.no_grad():  # LyCORIS zero-initialises one factor: randomise all so every ΔW is non-zero
        for p in net.parameters():
            p.normal_(0.0, 0.5)
    return model, net


def _files(tmp_path: Path, case: str) -> tuple[Path, Path, Tiny, object]:
    model, net = _network(*CASES[case])
    adapter = tmp_path / f"{case}.safetensors"
    net.save_weights(str(adapter), torch.float32, {"ss_network_module": "lycoris.kohya"})
    return adapter, _base(tmp_path, model), model, net


def _base(tmp_path: Path, model: nn.Module) -> Path:
    base = tmp_path / "model.safetensors"
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()
               if "lora" not in k and "lycoris" not in k}, base)
    return base


def _reference(net: object) -> dict[str, torch.Tensor]:
    """LyCORIS's own ΔW per module (kohya key → tensor), in float64: what its forward adds at multiplier 1."""
    out = {}
    for lm in net.loras:  # type: ignore[attr-defined]
        lm = lm.double()
        with torch.no_grad():
            if hasattr(lm, "get_weight"):
                out[lm.lora_name] = (lm.get_weight(lm.shape) * lm.scalar).reshape(lm.org_module[0].weight.shape)
            else:  # LoCon: make_weight (scalar included) times scale, modules/locon.py get_diff_weight
                out[lm.lora_name] = lm.get_diff_weight(1)[0].reshape(lm.org_module[0].weight.shape)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_delta_equals_lycoris(tmp_path: Path, case: str) -> None:
    adapter_path, base_path, model, net = _files(tmp_path, case)
    ref = _reference(net)
    adapter = read_adapter(adapter_path, base=load_base(base_path))
    assert sorted(adapter.modules) == ["conv", "conv_big", "fc", "point", "q_proj", "wide"]
    for name, m in adapter.items():
        want = ref["lora_te_" + name]
        got = m.delta(dtype=torch.float64)
        assert got.shape == want.shape == model.get_submodule(name).weight.shape
        err = (got - want).norm() / want.norm()
        assert want.norm() > 0 and err < 1e-6, (name, float(err))


@pytest.mark.parametrize("case", list(CASES))
def test_rank_is_product_of_ranks(tmp_path: Path, case: str) -> None:
    adapter_path, base_path, _, _ = _files(tmp_path, case)
    tensors = load_file(adapter_path)
    adapter = read_adapter(adapter_path, base=load_base(base_path))
    for name, m in adapter.items():
        key = "lora_te_" + name
        if case == "loha":
            want = tensors[key + ".hada_w1_b"].shape[0] * tensors[key + ".hada_w2_b"].shape[0]
        else:
            def rank(n: str) -> int:
                w = tensors.get(f"{key}.lokr_w{n}")
                if w is None:
                    return int(tensors[f"{key}.lokr_w{n}_b"].shape[0])
                return min(w.shape[0], w[0].numel())
            want = rank("1") * rank("2")
        assert m.rank == want, name


def test_lycoris_forward_is_the_reference(tmp_path: Path) -> None:
    """The reference ΔW is what LyCORIS's forward adds (for a linear: y − y₀ = x ΔWᵀ)."""
    model, net = _network(*CASES["loha"])
    ref = _reference(net)
    x = torch.randn(5, 12)
    with torch.no_grad():
        y = model.q_proj(x)
        net.restore()  # type: ignore[attr-defined]
        y0 = model.q_proj(x)
    torch.testing.assert_close(y - y0, x @ ref["lora_te_q_proj"].float().T, rtol=1e-5, atol=1e-5)


def test_lycoris_merge_to_scales_twice() -> None:
    """Why the forward is the reference: in 4.1.3 ``get_diff_weight`` (used by ``merge_to``) applies the scale
    on top of ``get_weight``, which already holds it. If this fails, LyCORIS changed: re-read its rule."""
    _, net = _network(*CASES["loha"])
    lm = net.loras[0]  # type: ignore[attr-defined]
    with torch.no_grad():
        assert lm.scale != 1
        torch.testing.assert_close(lm.get_diff_weight()[0], lm.get_weight(lm.shape) * lm.scale)


def test_without_base_keeps_flattened_names_and_matrix_form(tmp_path: Path) -> None:
    adapter_path, _, _, net = _files(tmp_path, "loha")
    ref = _reference(net)
    adapter = read_adapter(adapter_path)
    assert sorted(adapter.modules) == ["lora_te_conv", "lora_te_conv_big", "lora_te_fc", "lora_te_point",
                                       "lora_te_q_proj", "lora_te_wide"]
    m = adapter.modules["lora_te_conv"]  # LoHa stores a conv kernel flattened: without a base, a matrix
    assert m.kind == "linear"
    torch.testing.assert_close(m.delta(dtype=torch.float64), ref["lora_te_conv"].reshape(6, -1), rtol=1e-9, atol=0)


def test_inspect_shows_exact_ranks(tmp_path: Path) -> None:
    adapter_path, base_path, _, _ = _files(tmp_path, "loha")
    r = run_cli("inspect", adapter_path, "--base", base_path)
    assert r.returncode == 0, r.stderr
    assert "q_proj" in r.stdout and "conv" in r.stdout
    assert "4" in r.stdout  # rank 2·2


def test_merge_equals_lycoris_merged_weights(tmp_path: Path) -> None:
    adapter_path, base_path, model, net = _files(tmp_path, "lokr")
    ref = _reference(net)
    out = tmp_path / "merged.safetensors"
    lt.merge_model(base_path, [read_adapter(adapter_path, base=load_base(base_path))], out)
    merged, base = load_file(out), load_file(base_path)
    for name in ("q_proj", "fc", "conv", "point", "wide", "conv_big"):
        want = base[name + ".weight"].double() + ref["lora_te_" + name]
        torch.testing.assert_close(merged[name + ".weight"].double(), want, rtol=1e-6, atol=1e-6)


def test_convert_to_peft_keeps_delta(tmp_path: Path) -> None:
    adapter_path, base_path, _, net = _files(tmp_path, "loha")
    ref = _reference(net)
    out = tmp_path / "peft"
    r = run_cli("convert", adapter_path, "-o", out, "--to", "peft", "--base", base_path)
    assert r.returncode == 0, r.stderr
    back = read_adapter(out)
    for name, m in back.items():
        key = "lora_te_" + name.split(".")[-1]
        want = ref[key]
        assert float((m.delta(dtype=torch.float64) - want).norm() / want.norm()) < 1e-6, name


def _refused(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> str:
    path = tmp_path / "refused.safetensors"
    save_file(tensors, path)
    with pytest.raises(NotAnAdapterError) as e:
        read_adapter(path)
    return str(e.value)


def test_lycoris_loha_dora_is_refused_by_name(tmp_path: Path) -> None:
    """LoHa with ``dora_wd`` (DoHa): loratools reads LyCORIS DoRA on LoCon only (tests/test_lycoris_dora.py)."""
    _, net = _network("loha", {}, dora_wd=True)
    path = tmp_path / "dora.safetensors"
    net.save_weights(str(path), torch.float32, None)  # type: ignore[attr-defined]
    with pytest.raises(NotAnAdapterError, match="LyCORIS DoRA on a LoHa/LoKr module"):
        read_adapter(path)


@pytest.mark.parametrize(("keys", "kind"), [
    (("lokr_w1_a", "lokr_w1_b", "lokr_t1", "lokr_w2"), "LoKr with a Tucker core on its first factor"),
    (("diff", "diff_b"), "full"),
    (("a1.weight", "a2.weight", "b1.weight", "b2.weight"), "GLoRA"),
    (("oft_blocks", "rescale"), "OFT/BOFT"),
    (("weight", "on_input"), "(IA)³"),
])
def test_other_lycoris_kinds_are_refused_by_name(tmp_path: Path, keys: tuple[str, ...], kind: str) -> None:
    message = _refused(tmp_path, {f"lora_unet_conv_in.{k}": torch.ones(2, 2) for k in keys})
    assert f"LyCORIS {kind}" in message and "lora_unet_conv_in" in message and "\n" not in message


def test_mixed_lora_and_loha_tensors_are_refused(tmp_path: Path) -> None:
    t = {f"lora_te_x.{k}": torch.ones(2, 2) for k in ("lora_down.weight", "lora_up.weight", "hada_w1_a",
                                                        "hada_w1_b", "hada_w2_a", "hada_w2_b")}
    path = tmp_path / "mixed.safetensors"
    save_file(t, path)
    with pytest.raises(ValueError, match="both LoRA"):
        read_adapter(path)


@pytest.mark.parametrize("case", ["loha", "lokr"])
def test_bf16_file_reads_exactly_in_float32(tmp_path: Path, case: str) -> None:
    model, net = _network(*CASES[case])
    with torch.no_grad():  # the reference from the very numbers the bf16 file holds
        for p in net.parameters():  # type: ignore[attr-defined]
            p.copy_(p.bfloat16().float())
    path = tmp_path / "bf16.safetensors"
    net.save_weights(str(path), torch.bfloat16, None)  # type: ignore[attr-defined]
    base = tmp_path / "model.safetensors"
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items() if "lora" not in k}, base)
    ref = _reference(net)
    for name, m in read_adapter(path, base=load_base(base)).items():
        assert m.A.dtype == m.B.dtype == torch.float32
        want = ref["lora_te_" + name]
        assert float((m.delta(dtype=torch.float64) - want).norm() / want.norm()) < 1e-6, name


def test_scale_rules_without_alpha() -> None:
    """LyCORIS loads alpha 0 or missing as alpha = r (scale 1); LoKr with both sides full has scale 1 always."""
    from loratools.formats.kohya_lycoris import lycoris_factors
    t = {k: torch.randn(3, 2) if k.endswith("_a") else torch.randn(2, 5)
         for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
    assert lycoris_factors(t, None).scale == lycoris_factors(t, 0.0).scale == 1.0
    assert lycoris_factors(t, 3.0).scale == 1.5
    k = {"lokr_w1": torch.randn(2, 2), "lokr_w2_a": torch.randn(3, 1), "lokr_w2_b": torch.randn(1, 4)}
    assert lycoris_factors(k, 3.0).scale == 3.0
    assert lycoris_factors({"lokr_w1": torch.randn(2, 2), "lokr_w2": torch.randn(3, 4)}, 3.0).scale == 1.0


@pytest.mark.parametrize("algo", ["locon", "loha"])
def test_tucker_cores_read_exactly_as_lycoris(tmp_path: Path, algo: str) -> None:
    """``use_tucker`` on a convolution: LoCon's ``lora_mid`` and LoHa's ``hada_t1``/``hada_t2`` give an exact LoRA
    (rank r for LoCon, r₁·r₂ for LoHa) whose ΔW is LyCORIS's own, for the 3×3 convolutions that carry a core."""
    model, net = _network(algo, {}, use_tucker=True)
    path = tmp_path / "tucker.safetensors"
    net.save_weights(str(path), torch.float32, None)  # type: ignore[attr-defined]
    keys = load_file(path)
    core = "lora_mid.weight" if algo == "locon" else "hada_t1"
    assert {k.split(".")[0] for k in keys if k.endswith(core)} == {"lora_te_conv", "lora_te_conv_big"}
    ref = _reference(net)
    adapter = read_adapter(path)  # no base: the modules keep their kohya keys
    for name, m in adapter.items():
        want = ref[name]
        if name in ("lora_te_conv", "lora_te_conv_big"):  # the core carries the kernel: no base needed
            assert m.weight_shape == tuple(want.shape), name
        err = float((m.delta(dtype=torch.float64).reshape(want.shape) - want).norm() / want.norm())
        assert err < 1e-6, (name, err)
    r = 2  # conv_dim
    assert adapter.modules["lora_te_conv"].rank == (r if algo == "locon" else r * r)
    x = torch.randn(2, 4, 7, 7)
    with torch.no_grad():  # the reference is what LyCORIS's forward adds to the convolution
        added = model.conv(x).double() - torch.nn.functional.conv2d(x, model.conv.weight, model.conv.bias).double()
    assert torch.allclose(added, torch.nn.functional.conv2d(x.double(), ref["lora_te_conv"]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("algo", "opts", "conv"), [("locon", {}, "conv"), ("lokr", {"factor": 2}, "conv_big")])
def test_tucker_merges_as_lycoris_merge(tmp_path: Path, algo: str, opts: dict[str, object], conv: str) -> None:
    """The merged 3×3 convolution (LoCon ``lora_mid``, LoKr ``lokr_t2``) equals W0 + LyCORIS's ΔW (float64, one
    float32 rounding)."""
    model, net = _network(algo, opts, use_tucker=True)
    path = tmp_path / "tucker.safetensors"
    net.save_weights(str(path), torch.float32, None)  # type: ignore[attr-defined]
    base = _base(tmp_path, model)
    ref = _reference(net)
    done = run_cli("merge", base, path, "-o", tmp_path / "merged.safetensors", "--precision", "float64")
    assert done.returncode == 0, done.stderr
    w0, w1 = load_file(base), load_file(tmp_path / "merged.safetensors")
    want = w0[f"{conv}.weight"].double() + ref[f"lora_te_{conv}"]
    assert torch.allclose(w1[f"{conv}.weight"].double(), want, rtol=2**-23, atol=1e-7)


@pytest.mark.parametrize("factor", [2, -1])
def test_lokr_tucker_core_reads_exactly_as_lycoris(tmp_path: Path, factor: int) -> None:
    """LoKr ``use_tucker`` on a 3×3 convolution (``lokr_t2`` (r, r, 3, 3), ``lokr_w2_a`` (r, b), ``lokr_w2_b``
    (r, d)): an exact LoRA of rank rank(W1)·r whose ΔW is what LyCORIS's forward adds, scale alpha / r."""
    model, net = _network("lokr", {"factor": factor}, use_tucker=True)
    path = tmp_path / "lokr_tucker.safetensors"
    net.save_weights(str(path), torch.float32, None)  # type: ignore[attr-defined]
    tensors = load_file(path)
    assert "lora_te_conv_big.lokr_t2" in tensors and tensors["lora_te_conv_big.lokr_t2"].shape[2:] == (3, 3)
    ref = _reference(net)
    adapter = read_adapter(path, base=load_base(_base(tmp_path, model)))
    for name, m in adapter.items():
        want = ref["lora_te_" + name]
        assert m.weight_shape == tuple(want.shape), name
        err = float((m.delta(dtype=torch.float64) - want).norm() / want.norm())
        assert want.norm() > 0 and err < 1e-6, (name, err)
    w1 = tensors["lora_te_conv_big.lokr_w1"]
    assert adapter.modules["conv_big"].rank == min(w1.shape) * tensors["lora_te_conv_big.lokr_t2"].shape[0]
    x = torch.randn(2, 16, 7, 7)
    with torch.no_grad():  # the reference is what LyCORIS's forward adds to the convolution
        plain = torch.nn.functional.conv2d(x, model.conv_big.weight, model.conv_big.bias)
        added = model.conv_big(x).double() - plain.double()
    assert torch.allclose(added, torch.nn.functional.conv2d(x.double(), ref["lora_te_conv_big"]), rtol=1e-4,
                          atol=1e-4)


def test_lokr_tucker_core_beside_a_full_second_factor_is_refused(tmp_path: Path) -> None:
    t = {"lora_te_x.lokr_w1": torch.ones(2, 2), "lora_te_x.lokr_w2": torch.ones(3, 2, 3, 3),
         "lora_te_x.lokr_t2": torch.ones(1, 1, 3, 3)}
    path = tmp_path / "odd.safetensors"
    save_file(t, path)
    with pytest.raises(ValueError, match="lokr_t2 beside a full lokr_w2"):
        read_adapter(path)
