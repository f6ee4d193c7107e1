"""Odd but valid and damaged LyCORIS LoKr/LoHa files and mlx-lm adapter directories, against the producers.

LyCORIS 4.1.3 (``create_lycoris`` forward, ``create_network_from_weights``) and ComfyUI's LoKr rule
(``comfy/weight_adapter/lokr.py``: ``dim`` is ``w1_b.shape[0]`` then, when the second side is factored,
``w2_b.shape[0]``; scale ``alpha / dim``, 1 without a factored side) decide what a LoKr file means; a file no
LyCORIS run writes, on which they disagree or whose tensors they ignore, is refused. mlx-lm 0.32.2 (``.venv-mlx``, through ``tests/mlx_producer.py``) decides which
modules an adapter directory gives LoRA to (``linear_to_lora_layers``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import run_cli
from loratools.formats import load_base, read_adapter, write_adapter
from loratools.formats.kohya_lycoris import lycoris_factors
from test_mlx_format import _fused_deltas_match, _mixed, _mlx, needs_mlx

lycoris = pytest.importorskip("lycoris", reason="lycoris-lora 4.1.3 (the producer) is not installed")


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed + sum(shape)), dtype=torch.float64)


def _comfy_lokr(t: dict[str, torch.Tensor], alpha: float | None) -> torch.Tensor:
    """ComfyUI's LoKr ΔW (``comfy/weight_adapter/lokr.py`` ``calculate_weight``) of a linear module, in float64."""
    dim = None
    w1, w2 = t.get("lokr_w1"), t.get("lokr_w2")
    if w1 is None:
        dim, w1 = t["lokr_w1_b"].shape[0], t["lokr_w1_a"] @ t["lokr_w1_b"]
    if w2 is None:
        dim, w2 = t["lokr_w2_b"].shape[0], t["lokr_w2_a"] @ t["lokr_w2_b"]
    return torch.kron(w1, w2) * (alpha / dim if alpha is not None and dim is not None else 1.0)


def _lycoris_loaded(t: dict[str, torch.Tensor], alpha: float, shape: tuple[int, int]) -> torch.Tensor:
    """What LyCORIS 4.1.3's own loader (``create_network_from_weights``) makes of one module: its forward's ΔW."""
    from lycoris.kohya import create_network_from_weights
    te = nn.Module()
    te.fc = nn.Linear(shape[1], shape[0])
    sd = {f"lora_te_fc.{k}": v.float() for k, v in t.items()} | {"lora_te_fc.alpha": torch.tensor(alpha)}
    net, _ = create_network_from_weights(1.0, None, None, te, nn.Module(), weights_sd=sd, for_inference=True)
    lm = net.text_encoder_loras[0].double()
    with torch.no_grad():
        return (lm.get_weight(lm.shape) * lm.scalar).reshape(shape)


def _refused(tmp_path: Path, tensors: dict[str, torch.Tensor], named: str) -> None:
    path = tmp_path / "lyco.safetensors"
    save_file({f"lora_te_fc.{k}": v.float().contiguous() for k, v in tensors.items()}, path)
    res = run_cli("convert", path, "-o", tmp_path / "out", "--to", "peft")
    assert res.returncode == 2 and res.stdout == "", res.stderr
    assert res.stderr.startswith("loratools: error:") and res.stderr.count("\n") == 1, res.stderr
    assert named in res.stderr, res.stderr
    assert not (tmp_path / "out").exists()


def test_lokr_with_first_side_factored_and_second_whole_equals_lycoris_forward(tmp_path: Path) -> None:
    """``decompose_both`` with an unbalanced factorization makes w1 factored and w2 whole (a form LyCORIS's own
    loader cannot rebuild): ΔW is LyCORIS's forward, scale alpha / w1's rank, and ComfyUI's too."""
    torch.manual_seed(0)
    model = nn.Module()
    model.fc = nn.Linear(4, 64)
    lycoris.LycorisNetwork.apply_preset({"lora_prefix": "lora_te", "target_name": [".*"]})
    try:
        net = lycoris.create_lycoris(model, 1.0, linear_dim=2, linear_alpha=3.0, algo="lokr", factor=16,
                                     decompose_both=True, unbalanced_factorization=True)
    finally:
        lycoris.LycorisNetwork.apply_preset({"lora_prefix": "lycoris", "target_name": []})
    net.apply_to()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.5)
    path = tmp_path / "lokr.safetensors"
    net.save_weights(str(path), torch.float32, {})
    stored = {k.partition(".")[2]: v.double() for k, v in load_file(path).items()}
    assert sorted(stored) == ["alpha", "lokr_w1_a", "lokr_w1_b", "lokr_w2"]
    lm = net.loras[0].double()
    with torch.no_grad():
        want = (lm.get_weight(lm.shape) * lm.scalar).reshape(64, 4)
    got = read_adapter(path).modules["lora_te_fc"].delta(dtype=torch.float64)
    assert float((got - want).norm() / want.norm()) < 1e-6 and lm.scale == 1.5
    comfy = _comfy_lokr(stored, float(stored["alpha"]))
    assert float((got - comfy).norm() / comfy.norm()) < 1e-6


@pytest.mark.parametrize("side", ["1", "2"])
def test_lokr_side_stored_whole_and_factored_is_refused(tmp_path: Path, side: str) -> None:
    """Two forms of one factor: LyCORIS's loader and ComfyUI use the whole one and never read the pair (it was read
    that way too, silently); which was trained is unknown, so the file is refused as a stray tensor is."""
    t = {"lokr_w1": _rand(8, 2), "lokr_w2_a": _rand(8, 1), "lokr_w2_b": _rand(1, 2)}
    pair = {"lokr_w1_a": _rand(8, 1), "lokr_w1_b": _rand(1, 2)} if side == "1" else {"lokr_w2": _rand(8, 2)}
    if side == "1":  # LyCORIS builds this module (lora_dim from lokr_w1_a) and ignores the pair's values
        lyco = _lycoris_loaded(t | pair, 3.0, (64, 4))
        torch.testing.assert_close(lyco, _comfy_lokr(t, 3.0), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(_lycoris_loaded(t | {k: 2 * v for k, v in pair.items()}, 3.0, (64, 4)), lyco)
    _refused(tmp_path, t | pair | {"alpha": torch.tensor(3.0)}, f"both lokr_w{side} and lokr_w{side}_a")


def test_lokr_sides_factored_with_different_ranks_are_refused(tmp_path: Path) -> None:
    """LyCORIS scales by w1's rank (its loader cannot even build the module), ComfyUI by w2's."""
    t = {"lokr_w1_a": _rand(8, 1), "lokr_w1_b": _rand(1, 2), "lokr_w2_a": _rand(8, 2), "lokr_w2_b": _rand(2, 2)}
    with pytest.raises(RuntimeError):
        _lycoris_loaded(t, 3.0, (64, 4))
    _refused(tmp_path, t | {"alpha": torch.tensor(3.0)}, "different ranks (1 and 2)")


def test_lokr_sides_factored_with_one_rank_equal_comfyui_and_lycoris(tmp_path: Path) -> None:
    t = {"lokr_w1_a": _rand(8, 1), "lokr_w1_b": _rand(1, 2), "lokr_w2_a": _rand(8, 1), "lokr_w2_b": _rand(1, 2)}
    f = lycoris_factors(t, 3.0)
    got = f.scale * (f.B @ f.A)
    for want in (_comfy_lokr(t, 3.0), _lycoris_loaded(t, 3.0, (64, 4))):
        assert float((got - want).norm() / want.norm()) < 1e-6


@pytest.mark.parametrize("w1", [torch.tensor(2.0), torch.ones(2)], ids=["scalar", "vector"])
def test_lokr_whole_factor_that_is_not_a_matrix_is_refused(tmp_path: Path, w1: torch.Tensor) -> None:
    """A 0-d lokr_w1 was a traceback; a vector was read as a column where torch.kron (ComfyUI) takes a row."""
    _refused(tmp_path, {"lokr_w1": w1, "lokr_w2": _rand(4, 2)}, "is not a matrix")


@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_lycoris_factors_of_rank_zero_are_refused(tmp_path: Path, algo: str) -> None:
    """alpha / r with r = 0 (LyCORIS, ComfyUI): a damaged file, not an empty module."""
    if algo == "loha":
        t = {"hada_w1_a": _rand(8, 0), "hada_w1_b": _rand(0, 4), "hada_w2_a": _rand(8, 0), "hada_w2_b": _rand(0, 4)}
    else:
        t = {"lokr_w1": _rand(2, 2), "lokr_w2_a": _rand(4, 0), "lokr_w2_b": _rand(0, 2)}
    _refused(tmp_path, t | {"alpha": torch.tensor(1.0)}, "factors are empty (rank 0")


def test_loha_halves_of_different_ranks_scale_by_the_first_as_comfyui() -> None:
    """ComfyUI (``comfy/weight_adapter/loha.py``: ``dim = w1b.shape[0]``) and LyCORIS (``lora_dim =
    w1b.size(0)``) scale by the first half's rank; the exact LoRA form has rank r₁·r₂."""
    t = {"hada_w1_a": _rand(6, 2), "hada_w1_b": _rand(2, 5), "hada_w2_a": _rand(6, 3), "hada_w2_b": _rand(3, 5)}
    f = lycoris_factors(t, 4.0)
    want = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]) * 4.0 / 2
    assert f.A.shape[0] == 6 and float((f.scale * (f.B @ f.A) - want).norm() / want.norm()) < 1e-12


def _mlx_base(d: Path) -> Path:
    """The producer's tiny llama as a base loratools reads (3 layers, its weights)."""
    (d / "base").mkdir()
    shutil.copy(d / "base.safetensors", d / "base" / "model.safetensors")
    (d / "base" / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 3}))
    return d / "base"


@needs_mlx
@pytest.mark.parametrize("changes", [
    {"num_layers": 0},
    {"num_layers": -3},
    {"num_layers": 1, "lora_parameters": {"keys": ["self_attn.q_proj", "model.layers.0.self_attn.v_proj"]}},
], ids=["num_layers_0", "num_layers_-3", "full_path_key_below_num_layers"])
def test_modules_mlx_lm_gives_lora_are_read_with_its_fused_weights(tmp_path: Path, changes: dict) -> None:
    """mlx-lm gives LoRA to ``model.layers[-max(num_layers, 0):]`` (all of them for num_layers ≤ 0) and to a
    module its ``keys`` name by full path wherever it lies: these files were refused."""
    _mlx("produce", tmp_path, "lora", json.dumps(changes))
    base = _mlx_base(tmp_path)
    adapter = read_adapter(tmp_path / "adapter", base=load_base(base))
    assert "model.layers.0.self_attn.v_proj" in adapter.modules
    _fused_deltas_match(adapter, load_file(tmp_path / "base.safetensors"), load_file(tmp_path / "fused.safetensors"))
    res = run_cli("merge", base, tmp_path / "adapter", "-o", tmp_path / "merged")
    assert res.returncode == 0, res.stderr


@needs_mlx
def test_module_outside_the_layers_without_keys_is_refused_as_mlx_lm_refuses(tmp_path: Path) -> None:
    _mlx("produce", tmp_path, "lora")
    d = tmp_path / "adapter"
    cfg = json.loads((d / "adapter_config.json").read_text())
    del cfg["lora_parameters"]["keys"]
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    tensors = load_file(d / "adapters.safetensors")
    tensors |= {"lm_head.lora_a": torch.zeros(16, 4), "lm_head.lora_b": torch.ones(4, 40)}
    save_file(tensors, d / "adapters.safetensors", {"format": "mlx"})
    with pytest.raises(subprocess.CalledProcessError) as e:  # mlx-lm's load_adapters
        _mlx("load", tmp_path, d)
    assert b"lm_head.lora_a: not an adapter parameter" in e.value.stderr
    res = run_cli("convert", d, "-o", tmp_path / "out", "--to", "peft")
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "lm_head lies outside" in res.stderr, res.stderr
    assert not (tmp_path / "out").exists()


def test_a_rank_zero_kohya_lora_to_peft_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "r0.safetensors"
    save_file({"lora_te_fc.lora_down.weight": torch.zeros(0, 4), "lora_te_fc.lora_up.weight": torch.zeros(8, 0),
               "lora_te_fc.alpha": torch.tensor(1.0)}, path)
    res = run_cli("convert", path, "-o", tmp_path / "out", "--to", "peft")
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "rank 0" in res.stderr, res.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dropout", [1.0, -0.5, True])
def test_a_dropout_mlx_cannot_hold_is_written_as_zero_not_blamed_on_the_output(tmp_path: Path, dropout) -> None:
    """peft takes lora_dropout 1.0 (torch's Dropout allows p = 1); mlx's nn.Dropout refuses p outside [0, 1), so
    mlx-lm could not load it. It is training-only (no part of ΔW): written as 0. It used to fail the read-back
    with an error naming loratools' own temporary output as a damaged file."""
    write_adapter(_mixed(), tmp_path / "p", format="peft")
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    (tmp_path / "p" / "adapter_config.json").write_text(json.dumps(cfg | {"lora_dropout": dropout}))
    res = run_cli("convert", tmp_path / "p", "-o", tmp_path / "m", "--to", "mlx")
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "m" / "adapter_config.json").read_text())["lora_parameters"]["dropout"] == 0.0


def test_a_file_with_lycoris_own_prefix_reads_as_lycoris_forward(tmp_path: Path) -> None:
    """LyCORIS's own prefix (``lycoris_`` + the flattened path: ``create_lycoris`` + ``save_weights``, SimpleTuner)
    maps through the base's names as kohya's ``lora_te_`` does: the module's ΔW is LyCORIS's forward, the CLI merge
    adds it, and without a base the name stays flattened, which a convert says (as for kohya's own names)."""
    torch.manual_seed(0)
    model = nn.Module()
    model.fc = nn.Linear(4, 8)
    net = lycoris.create_lycoris(model, 1.0, linear_dim=2, linear_alpha=1.0, algo="lokr", factor=2)
    net.apply_to()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.5)
    net.save_weights(str(tmp_path / "a.safetensors"), torch.float32, {})
    assert sorted(load_file(tmp_path / "a.safetensors")) == [f"lycoris_fc.{k}" for k in ("alpha", "lokr_w1", "lokr_w2")]
    lm = net.loras[0].double()
    with torch.no_grad():
        want = (lm.get_weight(lm.shape) * lm.scalar).reshape(8, 4)
    net.restore()
    save_file({"fc.weight": model.fc.weight.detach().contiguous()}, tmp_path / "base.safetensors")
    got = read_adapter(tmp_path / "a.safetensors", base=load_base(tmp_path / "base.safetensors")).modules["fc"]
    assert float((got.delta(dtype=torch.float64) - want).norm() / want.norm()) < 1e-6
    res = run_cli("merge", tmp_path / "base.safetensors", tmp_path / "a.safetensors", "-o", tmp_path / "m.safetensors",
                  "--precision", "float64", "--device", "cpu")
    assert res.returncode == 0, res.stderr
    merged = load_file(tmp_path / "m.safetensors")["fc.weight"].double()
    assert float((merged - model.fc.weight.detach().double() - want).norm() / want.norm()) < 1e-6
    assert list(read_adapter(tmp_path / "a.safetensors").modules) == ["lycoris_fc"]
    res = run_cli("convert", tmp_path / "a.safetensors", "-o", tmp_path / "p", "--to", "peft")
    assert res.returncode == 0 and "kept in kohya's flattened form (e.g. lycoris_fc): pass --base" in res.stderr
