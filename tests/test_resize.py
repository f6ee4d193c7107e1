"""resize: re-truncation from the factors, checked against dense float64 SVD and peft."""

from __future__ import annotations

import pytest
import torch

from loratools.adapter import Adapter, Module
from loratools.formats import read_adapter
from loratools.linalg import choose_rank
from loratools.compress.resize import resize_adapter

from helpers import peft_heldout_loss


def _dense_truncation(D: torch.Tensor, k: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(D, full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k]


def test_rank_not_reduced_keeps_delta_exactly(adapters):
    src = read_adapter(adapters / "lora")
    res = resize_adapter(src, rank=8)
    for name, m in src.items():
        assert torch.equal(res.adapter.delta(name), m.delta())
        assert res.adapter.modules[name].rank == m.rank
    assert all(layer.rel_error == pytest.approx(0.0, abs=1e-6) for layer in res.layers)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_reduction_matches_dense_float64_svd(adapters, k):
    src = read_adapter(adapters / "rslora")
    res = resize_adapter(src, rank=k)
    for name, m in src.items():
        D = m.delta(dtype=torch.float64)
        ref = _dense_truncation(D, min(k, m.rank))
        got = res.adapter.modules[name].delta(dtype=torch.float64)
        assert res.adapter.modules[name].rank == min(k, m.rank)
        assert float((got - ref).abs().max()) <= 1e-5 * float(D.abs().max())
        layer = next(layer for layer in res.layers if layer.name == name)
        assert layer.rel_error == pytest.approx(float((D - ref).norm() / D.norm()), rel=1e-6, abs=1e-9)


def test_energy_and_error_rules_follow_the_dense_spectrum(adapters):
    src = read_adapter(adapters / "lora")
    for kw, rule in ((dict(energy=0.8), lambda s: choose_rank(s, energy=0.8)), (dict(error=0.4), lambda s: choose_rank(s, error=0.4))):
        res = resize_adapter(src, **kw)
        for name, m in src.items():
            s = torch.linalg.svdvals(m.delta(dtype=torch.float64))
            assert res.adapter.modules[name].rank == rule(s[: m.rank])


def test_adalora_to_lora_keeps_delta(adapters):
    src = read_adapter(adapters / "adalora")
    res = resize_adapter(src, rank=64)
    assert res.adapter.method == "lora"
    for name, m in src.items():
        D = m.delta(dtype=torch.float64)
        if name not in res.adapter.modules:
            assert float(D.abs().max()) == 0.0  # a rank-0 module adds nothing
            continue
        got = res.adapter.modules[name].delta(dtype=torch.float64)
        assert float((got - D).abs().max()) <= 1e-6 * max(1.0, float(D.abs().max()))


def test_conv_module_is_resized_in_its_layout():
    g = torch.Generator().manual_seed(0)
    m = Module(A=torch.randn(4, 3, 3, 3, generator=g), B=torch.randn(6, 4, 1, 1, generator=g), alpha=8, scale=2.0,
               kind="conv")
    res = resize_adapter(Adapter({"c": m}), rank=2)
    out = res.adapter.modules["c"]
    assert out.A.shape == (2, 3, 3, 3) and out.B.shape == (6, 2, 1, 1)
    ref = _dense_truncation(m.delta(dtype=torch.float64).reshape(6, -1), 2).reshape(6, 3, 3, 3)
    assert torch.allclose(out.delta(dtype=torch.float64), ref, atol=1e-5)


def test_cli_adalora_to_lora_loads_in_peft_with_same_logits(tiny_llama, adapters, tmp_path, cli):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    proc = cli("resize", adapters / "adalora", "-o", out, "--energy", "1.0")
    assert proc.returncode == 0, proc.stderr
    assert "adalora → lora" in proc.stdout and "model.layers.0.self_attn.v_proj" in proc.stdout
    ids = torch.tensor([[10, 20, 30, 40, 50, 60]])
    with torch.no_grad():
        ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), adapters / "adalora")(
            input_ids=ids).logits
        got = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), out)(input_ids=ids).logits
    assert torch.allclose(got, ref, atol=1e-5)


def test_cli_errors(adapters, tmp_path, cli):
    bad = cli("resize", adapters / "lora", "-o", tmp_path / "x")
    assert bad.returncode == 2 and "exactly one" in bad.stderr and not (tmp_path / "x").exists()
    bad = cli("resize", adapters / "lora", "-o", tmp_path / "x", "--energy", "1.5")
    assert bad.returncode == 2 and "energy" in bad.stderr
    bad = cli("resize", tmp_path / "nope", "-o", tmp_path / "x", "--rank", "2")
    assert bad.returncode == 2 and "not found" in bad.stderr


@pytest.mark.parametrize("case", ["random", "rank_deficient", "ill_conditioned"])
def test_factored_svd_is_the_dense_svd(case):
    from loratools.linalg import lowrank_svd

    g = torch.Generator().manual_seed(0)
    B, A = torch.randn(300, 6, generator=g, dtype=torch.float64), torch.randn(6, 200, generator=g, dtype=torch.float64)
    if case == "rank_deficient":
        B[:, 2] = 0.0  # Cholesky fails: the QR route takes over
    if case == "ill_conditioned":
        A[0] *= 1e-9
    M = B @ A
    U, S, Vh = lowrank_svd(B, A)
    U2, S2, Vh2 = torch.linalg.svd(M, full_matrices=False)  # the dense reference
    assert torch.allclose(S, S2[:6], rtol=1e-9, atol=1e-12 * float(S2[0]))
    assert float((U * S @ Vh - M).norm()) <= 1e-10 * float(M.norm())
    Ut, St, Vt = lowrank_svd(B, A, top=lambda s: 3)
    assert Ut.shape == (300, 3) and St.numel() == 6 and Vt.shape == (3, 200)
    assert torch.allclose((Ut * St[:3]) @ Vt, (U2[:, :3] * S2[:3]) @ Vh2[:3], atol=1e-9)


# --- issue "The practitioner's workflow", 3: the held-out loss before and after, beside the matrix error --------

def test_resize_reports_heldout_loss_before_and_after(cli, tiny_llama, adapters, tmp_path):
    import json

    data = tmp_path / "heldout.txt"  # plain text: packed into blocks as train packs it
    data.write_text(" ".join(f"the cat sat on mat number {i} and looked around." for i in range(40)))
    res = cli("resize", adapters / "lora", "-o", tmp_path / "r2", "--rank", "2", "--base", tiny_llama,
              "--data", data, "--json")
    assert res.returncode == 0, res.stderr
    held = json.loads(res.stdout)["heldout_loss"]
    assert held["before"] == pytest.approx(peft_heldout_loss(tiny_llama, adapters / "lora", data), rel=1e-4)
    assert held["after"] == pytest.approx(peft_heldout_loss(tiny_llama, tmp_path / "r2", data), rel=1e-4)
    assert held["base"] == pytest.approx(peft_heldout_loss(tiny_llama, None, data), rel=1e-4)
    table = cli("resize", adapters / "lora", "-o", tmp_path / "r3", "--rank", "3", "--base", tiny_llama, "--data", data)
    assert table.returncode == 0 and "held-out loss on" in table.stdout
    alone = cli("resize", adapters / "lora", "-o", tmp_path / "bad", "--rank", "3", "--data", data)
    assert alone.returncode == 2 and not (tmp_path / "bad").exists()


# --- the path-level job: resize_file ---------------------------------------------------------------------------------

def _same_adapter(a, b) -> bool:
    return set(a.modules) == set(b.modules) and all(
        torch.equal(a.modules[n].A, b.modules[n].A) and torch.equal(a.modules[n].B, b.modules[n].B)
        and a.modules[n].scale == b.modules[n].scale for n in a.modules)


def test_resize_file_writes_what_the_command_writes(cli, adapters, tmp_path):
    import json

    from loratools.compress.resize import resize_file

    proc = cli("resize", adapters / "adalora", "-o", tmp_path / "by-cli", "--energy", "0.9", "--json")
    assert proc.returncode == 0, proc.stderr
    res = resize_file(adapters / "adalora", tmp_path / "by-call", energy=0.9)
    assert res.output == str(tmp_path / "by-call") and res.format == "peft" and res.heldout is None
    assert res.method_before == "adalora" and res.adapter.method == "lora"
    assert _same_adapter(read_adapter(tmp_path / "by-cli"), read_adapter(tmp_path / "by-call"))
    # the command prints the job's own report
    assert json.loads(proc.stdout) == json.loads(json.dumps(res.to_json())) | {"output": str(tmp_path / "by-cli")}


def test_resize_file_refuses_an_existing_output_unless_forced(adapters, tmp_path):
    from loratools.compress.resize import resize_file
    from loratools.errors import OutputExistsError

    out = tmp_path / "small"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError):
        resize_file(adapters / "lora", out, rank=2)
    assert (out / "keep.txt").read_text() == "mine"  # untouched
    res = resize_file(adapters / "lora", out, rank=2, force=True, format="loratools")
    assert out.is_file() and all(m.rank == 2 for m in read_adapter(out).modules.values())
    assert res.format == "loratools"


@pytest.mark.parametrize("bad, error", [
    (dict(energy=1.5), "energy"),                            # a rule out of range
    (dict(rank=2, format="nope"), "nope"),                   # an unknown output format
    (dict(rank=2, data="heldout.txt"), "`base` and `data`"),  # data without a base
    (dict(rank=2, energy=0.5), "exactly one"),
])
def test_resize_file_writes_nothing_when_it_refuses(adapters, tmp_path, bad, error):
    from loratools.compress.resize import resize_file
    from loratools.errors import LoraToolsError

    with pytest.raises(LoraToolsError, match=error):
        resize_file(adapters / "lora", tmp_path / "out", **bad)
    assert list(tmp_path.iterdir()) == []  # neither the output nor a temporary


def test_resize_file_reports_progress_with_its_size(adapters, tmp_path):
    from loratools.compress.resize import resize_file

    calls: list[tuple[int, int | None]] = []
    resize_file(adapters / "lora", tmp_path / "out", rank=2,
                progress=lambda n=1, *, total=None: calls.append((n, total)))
    n = len(read_adapter(adapters / "lora").modules)
    assert calls[0] == (0, n) and calls[1:] == [(1, None)] * n
