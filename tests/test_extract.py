"""extract: full fine-tune → LoRA, checked against dense float64 SVD and against peft on the tiny model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from loratools.compress.extract import extract_adapter
from loratools.formats import read_adapter
from loratools.io import ModelReader, load_safetensors, save_safetensors
from loratools.linalg import choose_rank, truncated_svd

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_tuned(src: Path, dst: Path, *, rank: int, noise: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """A 'fine-tuned' copy of the model at ``src``: every block projection plus a rank-``rank``
    delta (and Gaussian noise of relative size ``noise``). Returns the dense deltas."""
    g = torch.Generator().manual_seed(seed)
    shutil.copytree(src, dst)
    tensors, meta = load_safetensors(src / "model.safetensors")
    deltas = {}
    for key, w in tensors.items():
        if key.endswith(".weight") and any(p in key for p in PROJ):
            m, n = w.shape
            d = torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g) * (0.02 / rank**0.5)
            d = d + noise * 0.02 * torch.randn(m, n, generator=g) / (min(m, n) ** 0.5)
            deltas[key] = d
            tensors[key] = w + d
    save_safetensors(tensors, dst / "model.safetensors", meta)
    return deltas


@pytest.fixture
def exact8(tiny_llama, tmp_path):
    d = make_tuned(tiny_llama, tmp_path / "tuned", rank=8, noise=0.0)
    return tmp_path / "tuned", d


@pytest.fixture
def noisy(tiny_llama, tmp_path):
    d = make_tuned(tiny_llama, tmp_path / "tuned", rank=8, noise=0.3, seed=1)
    return tmp_path / "tuned", d


def test_exact_rank8_delta_is_recovered(tiny_llama, exact8):
    tuned, deltas = exact8
    res = extract_adapter(ModelReader(tiny_llama), ModelReader(tuned), rank=8, device="cpu")
    assert {f"{r.name}.weight" for r in res.layers} == set(deltas)
    for r in res.layers:
        assert r.rank == 8 and r.rel_error <= 1e-5, r
        m = res.adapter.modules[r.name]
        ref = deltas[f"{r.name}.weight"].double()
        assert float((m.delta(dtype=torch.float64) - ref).norm() / ref.norm()) <= 1e-5
    assert res.parameters < res.delta_parameters
    # embeddings and norms are reported, not extracted
    whys = {s.name: s.why for s in res.skipped}
    assert whys["model.embed_tokens.weight"].startswith("embedding")
    assert whys["model.layers.0.input_layernorm.weight"].startswith("norm")
    assert whys["lm_head.weight"].startswith("outside")


def test_noisy_error_is_within_one_percent_of_optimal(tiny_llama, noisy):
    tuned, deltas = noisy
    r = 4
    res = extract_adapter(ModelReader(tiny_llama), ModelReader(tuned), rank=r, device="cpu")
    for layer in res.layers:
        D = deltas[f"{layer.name}.weight"].double()
        s = torch.linalg.svdvals(D)
        optimal = float(s[r:].square().sum().sqrt() / s.norm())
        measured = float((res.adapter.modules[layer.name].delta(dtype=torch.float64) - D).norm() / D.norm())
        assert measured == pytest.approx(layer.rel_error, rel=1e-4, abs=1e-6)  # the report is the measured error
        assert optimal <= measured * (1 + 1e-5) and measured <= optimal * 1.01, (layer.name, measured, optimal)
        assert layer.energy_kept == pytest.approx(float(s[:r].square().sum() / s.square().sum()), rel=1e-3)


def test_energy_and_error_rules_pick_the_smallest_rank(tiny_llama, noisy):
    tuned, deltas = noisy
    for kw, rule in ((dict(energy=0.9), lambda s: choose_rank(s, energy=0.9)), (dict(error=0.3), lambda s: choose_rank(s, error=0.3))):
        res = extract_adapter(ModelReader(tiny_llama), ModelReader(tuned), device="cpu", **kw)
        for layer in res.layers:
            s = torch.linalg.svdvals(deltas[f"{layer.name}.weight"].double())
            # randomized σ can only undershoot, so the rank may exceed the exact one by one at a knife edge
            assert rule(s) <= layer.rank <= rule(s) + 1, (kw, layer)
            if "error" in kw:
                assert layer.rel_error <= 0.3 + 1e-6
            else:
                assert layer.energy_kept >= 0.9 - 1e-6
    capped = extract_adapter(ModelReader(tiny_llama), ModelReader(tuned), device="cpu", energy=0.999, max_rank=5)
    assert max(layer.rank for layer in capped.layers) == 5


@pytest.mark.parametrize("kw", [dict(energy=0.8), dict(error=0.2), dict(rank=12)])
def test_randomized_path_meets_targets_on_a_bigger_matrix(kw):
    g = torch.Generator().manual_seed(3)
    U = torch.linalg.qr(torch.randn(400, 300, generator=g)).Q
    V = torch.linalg.qr(torch.randn(300, 300, generator=g)).Q
    s = 1.0 / torch.arange(1, 301, dtype=torch.float32)
    M = (U * s) @ V.T
    Uk, Sk, Vk, method = truncated_svd(M, generator=torch.Generator().manual_seed(0), **kw)
    assert method == "randomized"
    err = float((M.double() - (Uk * Sk).double() @ Vk.double()).norm() / M.double().norm())
    exact = torch.linalg.svdvals(M.double())
    k = Sk.numel()
    if "rank" in kw:
        assert k == 12 and err <= float(exact[k:].square().sum().sqrt() / exact.norm()) * 1.01
    elif "error" in kw:
        assert err <= 0.2 + 1e-6 and k in (choose_rank(exact, error=0.2), choose_rank(exact, error=0.2) + 1)
    else:
        assert 1 - err**2 >= 0.8 - 1e-6 and k in (choose_rank(exact, energy=0.8), choose_rank(exact, energy=0.8) + 1)


def test_conv_and_conv1d_layouts():
    g = torch.Generator().manual_seed(0)
    conv = torch.randn(8, 2, generator=g) @ torch.randn(2, 4 * 3 * 3, generator=g)
    c1d = torch.randn(16, 3, generator=g) @ torch.randn(3, 48, generator=g)  # GPT-2 Conv1D: weight (in, out)
    base = {"h.0.conv.weight": torch.zeros(8, 4, 3, 3), "h.0.attn.c_attn.weight": torch.zeros(16, 48)}
    tuned = {"h.0.conv.weight": conv.reshape(8, 4, 3, 3), "h.0.attn.c_attn.weight": c1d}
    res = extract_adapter(base, tuned, rank=3, fan_in_fan_out=True, device="cpu")
    mc, ml = res.adapter.modules["h.0.conv"], res.adapter.modules["h.0.attn.c_attn"]
    assert mc.kind == "conv" and mc.A.shape == (2 if mc.rank == 2 else 3, 4, 3, 3) and mc.B.shape[2:] == (1, 1)
    assert torch.allclose(mc.delta(), tuned["h.0.conv.weight"], atol=1e-5)
    assert ml.fan_in_fan_out and ml.weight_shape == (16, 48) and ml.A.shape == (3, 16)
    assert torch.allclose(ml.delta(), c1d, atol=1e-5)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.double()


@pytest.mark.parametrize("noise", [0.0, 0.05])
def test_extracted_adapter_in_peft_reproduces_tuned_logits(tiny_llama, tmp_path, cli, noise):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tuned = tmp_path / "tuned"
    make_tuned(tiny_llama, tuned, rank=6, noise=noise, seed=2)
    out = tmp_path / "lora"
    # with noise, an error target gives ranks that differ per layer: PEFT must follow rank_pattern
    rule = ["--rank", "6"] if noise == 0.0 else ["--error", "0.003", "--max-rank", "48"]
    proc = cli("extract", tiny_llama, tuned, "-o", out, *rule, "--device", "cpu", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert len(report["layers"]) == 28
    if noise:
        assert len({layer["rank"] for layer in report["layers"]}) > 1
        assert json.loads((out / "adapter_config.json").read_text())["rank_pattern"]
    ids = torch.tensor([[5, 17, 42, 99, 3, 64, 71, 200]])
    base_m = AutoModelForCausalLM.from_pretrained(tiny_llama)
    ref_base = _logits(base_m, ids)
    ref_tuned = _logits(AutoModelForCausalLM.from_pretrained(tuned), ids)
    # reference: the base with our adapter's dense ΔW added by hand
    merged = AutoModelForCausalLM.from_pretrained(tiny_llama)
    adapter = read_adapter(out)
    with torch.no_grad():
        for name, m in adapter.items():
            merged.get_submodule(name).weight += m.delta()
    ref_merged = _logits(merged, ids)
    peft_logits = _logits(PeftModel.from_pretrained(base_m, out), ids)
    assert torch.allclose(peft_logits, ref_merged, atol=1e-4)
    change = float((ref_tuned - ref_base).norm())
    miss = float((peft_logits - ref_tuned).norm())
    if noise == 0.0:
        assert report["rel_error"] <= 1e-5 and miss <= 1e-4 * change
    else:
        # the logit error, relative to the fine-tune's logit change, is of the order of the weight error reported
        assert 0.0005 < report["rel_error"] <= 0.003
        assert miss <= 5 * report["rel_error"] * change, (miss, change, report["rel_error"])


def test_cli_table_and_errors(tiny_llama, exact8, tmp_path, cli):
    tuned, _ = exact8
    out = tmp_path / "a.safetensors"
    proc = cli("extract", tiny_llama, tuned, "-o", out, "--error", "0.01", "--targets", "q_proj,v_proj",
               "--format", "loratools", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert "model.layers.3.self_attn.v_proj" in proc.stdout and "left out" in proc.stdout
    ad = read_adapter(out)
    assert len(ad.modules) == 8 and all(m.rank == 8 for m in ad.modules.values())
    bad = cli("extract", tiny_llama, tuned, "-o", tmp_path / "x", "--rank", "4", "--energy", "0.9")
    assert bad.returncode == 2 and "exactly one" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "x").exists()
    missing = cli("extract", tmp_path / "nope", tuned, "-o", tmp_path / "y", "--rank", "4")
    assert missing.returncode == 2 and "not found" in missing.stderr
    exists = cli("extract", tiny_llama, tuned, "-o", out, "--rank", "4")
    assert exists.returncode == 2 and "--force" in exists.stderr


def test_job_names_do_not_shadow_their_modules():
    """`loratools.compress.extract` is the module (its ExtractResult reachable); the job is `extract_adapter`."""
    import importlib
    import types

    import loratools
    import loratools.compress.extract as m

    assert m.ExtractResult.__name__ == "ExtractResult"
    for module, job in [("extract", "extract_adapter"), ("resize", "resize_adapter"), ("prune", "prune_adapter")]:
        home = importlib.import_module(f"loratools.compress.{module}")
        assert isinstance(home, types.ModuleType), module
        assert getattr(loratools, job) is getattr(home, job)
        assert job in loratools.__all__ and module not in loratools.__all__


def test_rank_rule_value_or_keywords_give_the_same_adapter():
    from loratools.errors import InvalidOptionError
    from loratools.linalg import RankRule

    W0 = {"m.0.q.weight": torch.zeros(12, 10)}
    W1 = {"m.0.q.weight": torch.randn(12, 10, generator=torch.Generator().manual_seed(0))}
    a = extract_adapter(W0, W1, RankRule(energy=0.8, max_rank=4), device="cpu")
    b = extract_adapter(W0, W1, energy=0.8, max_rank=4, device="cpu")
    assert torch.equal(a.adapter.modules["m.0.q"].A, b.adapter.modules["m.0.q"].A)
    with pytest.raises(InvalidOptionError, match="not both"):
        extract_adapter(W0, W1, RankRule(rank=2), rank=3, device="cpu")
    with pytest.raises(InvalidOptionError, match="`rank`"):
        extract_adapter(W0, W1, rank=0, device="cpu")


def test_cli_reports_heldout_loss_of_tuned_and_of_base_plus_adapter(tiny_llama, noisy, tmp_path, cli):
    from helpers import peft_heldout_loss

    tuned, _ = noisy
    data = tmp_path / "heldout.txt"
    data.write_text(" ".join(f"the cat sat on mat number {i} and looked around." for i in range(40)))
    out = tmp_path / "adapter"
    proc = cli("extract", tiny_llama, tuned, "-o", out, "--rank", "2", "--device", "cpu", "--data", data, "--json")
    assert proc.returncode == 0, proc.stderr
    held = json.loads(proc.stdout)["heldout_loss"]
    assert held["before"] == pytest.approx(peft_heldout_loss(tuned, None, data), rel=1e-4)  # the fine-tune itself
    assert held["after"] == pytest.approx(peft_heldout_loss(tiny_llama, out, data), rel=1e-4)
    assert held["base"] == pytest.approx(peft_heldout_loss(tiny_llama, None, data), rel=1e-4)
    assert len({round(v, 6) for v in (held["before"], held["after"], held["base"])}) == 3
    table = cli("extract", tiny_llama, tuned, "-o", tmp_path / "a2", "--rank", "2", "--data", data)
    assert table.returncode == 0 and "held-out loss on" in table.stdout and "tuned" in table.stdout


# --- the path-level job: extract_model -------------------------------------------------------------------------------

def test_extract_model_is_read_extract_write(tiny_llama, exact8, tmp_path):
    from loratools.compress.extract import extract_model

    tuned, _ = exact8
    out = tmp_path / "adapter.safetensors"
    seen: list[tuple[int, int | None]] = []
    res = extract_model(tiny_llama, tuned, out, rank=4, format="loratools", dtype="float32", device="cpu",
                        progress=lambda n=1, *, total=None: seen.append((n, total)))
    ref = extract_adapter(ModelReader(tiny_llama), ModelReader(tuned), rank=4, device="cpu", dtype=torch.float32)
    written = read_adapter(out)
    assert res.output == str(out) and res.format == "loratools" and res.heldout is None
    assert set(written.modules) == set(ref.adapter.modules)
    for name, m in ref.adapter.items():
        assert torch.equal(written.modules[name].A, m.A) and torch.equal(written.modules[name].B, m.B)
    with ModelReader(tiny_llama) as base_r:
        assert seen[0] == (0, len(base_r.keys())) and sum(n for n, _ in seen) == len(base_r.keys())
    report = res.to_json()
    assert report["rel_error"] == res.total_rel_error and len(report["layers"]) == len(res.layers) == 28


def test_extract_model_refuses_before_reading(tiny_llama, exact8, tmp_path):
    from loratools.compress.extract import extract_model
    from loratools.errors import InvalidOptionError, OutputExistsError

    tuned, _ = exact8
    (tmp_path / "exists").mkdir()
    with pytest.raises(OutputExistsError):
        extract_model(tiny_llama, tuned, tmp_path / "exists", rank=4)
    with pytest.raises(InvalidOptionError, match="dtype"):
        extract_model(tiny_llama, tuned, tmp_path / "x", rank=4, dtype="float8")
    with pytest.raises(InvalidOptionError, match="exactly one"):
        extract_model(tiny_llama, tuned, tmp_path / "x", rank=4, error=0.1)
    assert not (tmp_path / "x").exists() and list((tmp_path / "exists").iterdir()) == []


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_weight_is_refused_in_one_line_and_nothing_is_written(tiny_llama, tmp_path, cli, value):
    """A NaN or ±inf in the fine-tuned model makes ΔW non-finite: one line naming the weight, not LAPACK's error."""
    tuned = tmp_path / "tuned"
    shutil.copytree(tiny_llama, tuned)
    tensors, meta = load_safetensors(tuned / "model.safetensors")
    key = "model.layers.1.self_attn.q_proj.weight"
    tensors[key][3, 5] = value
    save_safetensors(tensors, tuned / "model.safetensors", meta)
    r = cli("extract", tiny_llama, tuned, "-o", tmp_path / "out", "--rank", "4", "--device", "cpu")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert key in lines[0] and "NaN or Inf" in lines[0]
    assert not (tmp_path / "out").exists()
