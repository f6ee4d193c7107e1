"""prune: AdaLoRA importance and budget allocation, checked against peft's gradients and logits."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loratools.adapter import Adapter, Module
from loratools.config import AdapterConfig
from loratools.formats import read_adapter, write_adapter
from loratools.adalora import allocate, update_sensitivity
from loratools.lm.load import load_causal_lm
from loratools.compress.prune import calibration_scores, prune_adapter, svd_form, triplet_gradients

IDS = torch.tensor([[10, 20, 30, 40, 50, 60, 70]])


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits.double()


def _merged_logits(tiny_llama, adapter):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with torch.no_grad():
        for name, m in adapter.items():
            model.get_submodule(name).weight += m.delta()
    return _logits(model)


def _peft_logits(tiny_llama, path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return _logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), path))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.floats(0, 10, allow_nan=False), min_size=0, max_size=6), min_size=1, max_size=5),
       st.data())
def test_allocate_keeps_the_global_top_budget(rows, data):
    scores = {f"m{i}": torch.tensor(r, dtype=torch.float64) for i, r in enumerate(rows)}
    total = sum(len(r) for r in rows)
    budget = data.draw(st.integers(0, total))
    masks = allocate(scores, budget)
    kept = [float(v) for n in scores for v, k in zip(scores[n], masks[n]) if k]
    dropped = [float(v) for n in scores for v, k in zip(scores[n], masks[n]) if not k]
    assert len(kept) == budget
    assert not kept or not dropped or min(kept) >= max(dropped)


def test_magnitude_prune_of_lora_keeps_the_largest_singular_values(tiny_llama, adapters, tmp_path):
    src = read_adapter(adapters / "lora")
    budget = 20
    res = prune_adapter(src, budget=budget)
    assert res.importance == "magnitude" and sum(res.rank_pattern.values()) == budget
    # reference: dense float64 SVD of every ΔW, the 20 largest σ over all layers
    svals = {n: torch.linalg.svdvals(m.delta(dtype=torch.float64)) for n, m in src.items()}
    threshold = sorted((float(v) for s in svals.values() for v in s[:8]), reverse=True)[budget - 1]
    for name, m in src.items():
        k = int((svals[name][:8] >= threshold * (1 - 1e-9)).sum())
        assert res.adapter.modules[name].rank == k if k else name not in res.adapter.modules
        if k:
            U, S, Vh = torch.linalg.svd(m.delta(dtype=torch.float64), full_matrices=False)
            ref = (U[:, :k] * S[:k]) @ Vh[:k]
            assert torch.allclose(res.adapter.modules[name].delta(dtype=torch.float64), ref, atol=1e-6)
    out = tmp_path / "pruned"
    write_adapter(res.adapter, out)
    assert torch.allclose(_peft_logits(tiny_llama, out), _merged_logits(tiny_llama, res.adapter), atol=1e-4)


@pytest.mark.parametrize("to_lora", [False, True])
def test_adalora_prune_loads_in_peft(tiny_llama, adapters, tmp_path, to_lora):
    src = read_adapter(adapters / "adalora")
    res = prune_adapter(src, budget=9, to_lora=to_lora)
    assert sum(m.rank for m in res.adapter.modules.values()) == 9
    assert res.adapter.method == ("lora" if to_lora else "adalora")
    out = tmp_path / "pruned"
    write_adapter(res.adapter, out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    if not to_lora:
        assert sum(sum(mask) for mask in cfg["rank_pattern"].values()) + sum(
            m.rank for n, m in res.adapter.items() if f"{n}.lora_E" not in cfg["rank_pattern"]) == 9
    assert torch.allclose(_peft_logits(tiny_llama, out), _merged_logits(tiny_llama, res.adapter), atol=1e-4)


def test_lambda_gradients_equal_peft_lora_E_gradients(tiny_llama, adapters):
    """Our hook-applied adapter gives the same ∂L/∂λ as PEFT's own AdaLoRA layers (lora_E)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    src = read_adapter(adapters / "adalora")
    batch = {"input_ids": IDS, "labels": IDS}
    model, _ = load_causal_lm(tiny_llama, device=torch.device("cpu"), frozen=True)
    ours = triplet_gradients(model, svd_form(src), batch, kinds={n: m.kind for n, m in src.items()})
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), adapters / "adalora")
    for n, p in peft_model.named_parameters():
        p.requires_grad_("lora_E" in n)
    # PEFT's AdaLoRA adds its orthogonal regulariser to a returned loss: take the plain LM loss by hand
    logits = peft_model(input_ids=IDS).logits
    torch.nn.functional.cross_entropy(logits[0, :-1], IDS[0, 1:]).backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters() if "lora_E" in n}
    checked = 0
    for name, g in ours.items():
        ref = next(v for k, v in grads.items() if f".{name}.lora_E" in k)
        assert torch.allclose(g["lam"][1], ref.reshape(-1), rtol=1e-4, atol=1e-7), name
        checked += 1
    assert checked >= 10 and sum(float(g["lam"][1].abs().sum()) for g in ours.values()) > 0


def test_gradient_importance_differs_from_magnitude(tiny_llama, tmp_path):
    """The largest triplet only touches tokens the calibration text never uses: its gradient
    importance is 0 (pruned), while magnitude keeps it."""
    model, tok = load_causal_lm(tiny_llama, device=torch.device("cpu"), frozen=True)
    texts = ["the cat sat on the mat", "a quiet child remembers the morning light"]
    used = {i for t in texts for i in tok(t)["input_ids"]}
    unused = [i for i in range(259) if i not in used]
    g = torch.Generator().manual_seed(0)
    A = torch.zeros(2, 259)
    A[0, unused[:40]] = 1.0 / 40**0.5      # triplet 0: unused tokens, σ = 5
    A[1, sorted(used)] = 1.0 / len(used) ** 0.5  # triplet 1: used tokens, σ = 1
    P = torch.linalg.qr(torch.randn(128, 2, generator=g)).Q
    B = P * torch.tensor([5.0, 1.0])
    emb = Module(A=A, B=B, alpha=2.0, scale=1.0, kind="embedding")
    adapter = Adapter({"model.embed_tokens": emb}, AdapterConfig(task_type="CAUSAL_LM"))
    scores = calibration_scores(adapter, model, tok, [(t, None) for t in texts])
    s = scores["model.embed_tokens"]
    lam = svd_form(adapter)["model.embed_tokens"].lam
    assert lam[0] > lam[1] * 4  # magnitude ranks the unused-token triplet first
    # gradients rank it last (0 up to the rounding of the SVD that puts the LoRA in triplet form)
    assert float(s[1]) > 0.0 and float(s[0]) < 1e-9 * float(s[1])
    by_gradient = prune_adapter(adapter, budget=1, importance=scores).layers[0].kept
    assert prune_adapter(adapter, budget=1).layers[0].kept != by_gradient


def test_sensitivity_ema_matches_the_recursion():
    torch.manual_seed(0)
    p, grads = torch.randn(5), [torch.randn(5) for _ in range(4)]
    st_ = None
    ipt = unc = torch.zeros(5)
    for gr in grads:
        st_ = update_sensitivity(st_, p, gr, beta1=0.7, beta2=0.6)
        I = (p * gr).abs()
        ipt = 0.7 * ipt + 0.3 * I
        unc = 0.6 * unc + 0.4 * (I - ipt).abs()
    assert torch.allclose(st_.ipt, ipt) and torch.allclose(st_.unc, unc) and torch.allclose(st_.score, ipt * unc)


def test_cli_prune_with_calibration_data(tiny_llama, adapters, tmp_path, cli):
    data = tmp_path / "calib.jsonl"
    data.write_text("\n".join([json.dumps({"text": "The cat carries a box of letters."}),
                               json.dumps({"prompt": "The capital of France is", "completion": " Paris."})]) + "\n")
    out = tmp_path / "pruned"
    proc = cli("prune", adapters / "lora", "-o", out, "--budget", "24", "--base", tiny_llama, "--data", data,
               "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert "importance: gradient" in proc.stdout and "kept 24 triplets" in proc.stdout
    pruned = read_adapter(out)
    assert sum(m.rank for m in pruned.modules.values()) == 24
    assert torch.allclose(_peft_logits(tiny_llama, out), _merged_logits(tiny_llama, pruned), atol=1e-4)


def test_cli_prune_errors(tiny_llama, adapters, tmp_path, cli):
    proc = cli("prune", adapters / "adalora", "-o", tmp_path / "a", "--budget", "10")
    assert proc.returncode == 0 and "magnitude" in proc.stderr
    bad = cli("prune", adapters / "lora", "-o", tmp_path / "x", "--budget", "1000")
    assert bad.returncode == 2 and "budget" in bad.stderr and not (tmp_path / "x").exists()
    bad = cli("prune", adapters / "lora", "-o", tmp_path / "x", "--budget", "4", "--base", tiny_llama)
    assert bad.returncode == 2 and "--data" in bad.stderr
    (tmp_path / "bad.jsonl").write_text('{"oops": 1}\n')
    bad = cli("prune", adapters / "lora", "-o", tmp_path / "x", "--budget", "4", "--base", tiny_llama,
              "--data", tmp_path / "bad.jsonl")
    assert bad.returncode == 2 and "line 1" in bad.stderr


def test_missing_transformers_says_how_to_install(tiny_llama, monkeypatch):
    import sys

    from loratools.errors import MissingDependencyError

    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(MissingDependencyError, match=r"loratools\[train\]"):
        load_causal_lm(tiny_llama, device=torch.device("cpu"))


# --- issue "The practitioner's workflow", 7: --keep, --max-examples, --json, calibration progress -----------------

def test_prune_keep_fraction_json_and_calibration_progress(cli, tiny_llama, adapters, tmp_path):
    import json

    src = read_adapter(adapters / "adalora")
    total = sum(m.rank for m in src.modules.values())
    res = cli("prune", adapters / "adalora", "-o", tmp_path / "half", "--keep", "0.5", "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["budget"] == round(0.5 * total) == report["kept"]
    assert sum(m.rank for m in read_adapter(tmp_path / "half").modules.values()) == round(0.5 * total)
    assert report["parameters"] == read_adapter(tmp_path / "half").parameters
    # the same as the absolute budget
    cli("prune", adapters / "adalora", "-o", tmp_path / "abs", "--budget", str(round(0.5 * total)))
    assert {n: m.rank for n, m in read_adapter(tmp_path / "abs").modules.items()} == \
           {n: m.rank for n, m in read_adapter(tmp_path / "half").modules.items()}
    for bad in (["--keep", "1.5"], ["--keep", "0.5", "--budget", "3"], []):
        r = cli("prune", adapters / "adalora", "-o", tmp_path / "bad", *bad)
        assert r.returncode == 2 and not (tmp_path / "bad").exists(), bad
    data = tmp_path / "calib.jsonl"
    data.write_text("".join(json.dumps({"text": f"the quick brown fox {i} jumps"}) + "\n" for i in range(30)))
    res = cli("prune", adapters / "adalora", "-o", tmp_path / "cal", "--budget", "8", "--base", tiny_llama,
              "--data", data, "--max-examples", "5")
    assert res.returncode == 0, res.stderr
    lines = [l for l in res.stderr.splitlines() if l.startswith("calibrating:")]
    assert lines and lines[-1] == "calibrating: 5/5"  # --max-examples bounded the run, progress reported
    assert "held-out loss on" in res.stdout and "(the calibration data)" in res.stdout


# --- the path-level job: prune_file ----------------------------------------------------------------------------------

def test_prune_file_is_read_prune_write(adapters, tmp_path):
    from loratools.compress.prune import budget_of, prune_file

    src = read_adapter(adapters / "adalora")
    res = prune_file(adapters / "adalora", tmp_path / "half", keep=0.5, to_lora=True)
    ref = prune_adapter(src, budget=budget_of(src, 0.5), to_lora=True)
    assert res.budget == budget_of(src, 0.5) == res.kept and res.rank_pattern == ref.rank_pattern
    assert (res.importance, res.method_before, res.parameters_before) == ("magnitude", "adalora", src.parameters)
    assert res.output == str(tmp_path / "half") and res.heldout is None
    written = read_adapter(tmp_path / "half")
    for name, m in ref.adapter.items():
        assert torch.allclose(written.modules[name].delta(), m.delta())
    report = res.to_json()
    assert report["kept"] == res.kept and report["method"] == "lora" and report["heldout_loss"] is None


@pytest.mark.parametrize("bad, error", [
    (dict(), "`budget` N or `keep` F"),
    (dict(budget=3, keep=0.5), "`budget` N or `keep` F"),
    (dict(keep=1.5), "keep"),
    (dict(budget=1000), "budget"),
    (dict(budget=4, data="calib.jsonl"), "`base` and `data`"),
    (dict(budget=4, max_examples=0), "max_examples"),
    (dict(budget=4, format="nope"), "nope"),
])
def test_prune_file_writes_nothing_when_it_refuses(adapters, tmp_path, bad, error):
    from loratools.compress.prune import prune_file
    from loratools.errors import LoraToolsError

    with pytest.raises(LoraToolsError, match=error):
        prune_file(adapters / "lora", tmp_path / "out", **bad)
    assert list(tmp_path.iterdir()) == []


def test_calibration_encodes_rows_as_training_does(tiny_llama):
    """One encoder for a data row (lm.data.row_example): text + EOS, completion-only targets."""
    from loratools.compress.prune import _encode
    from loratools.lm.data import IGNORE, Row

    _, tok = load_causal_lm(tiny_llama, device=torch.device("cpu"), frozen=True)
    text = _encode(tok, Row("the cat sat"), torch.device("cpu"), 256)
    ids = tok("the cat sat", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert text is not None and text["input_ids"][0].tolist() == ids == text["labels"][0].tolist()
    pc = _encode(tok, Row("the cat", " sat"), torch.device("cpu"), 256)
    assert pc is not None
    prompt = tok("the cat", add_special_tokens=False)["input_ids"]
    assert pc["labels"][0, :len(prompt)].tolist() == [IGNORE] * len(prompt)
    assert _encode(tok, Row("a"), torch.device("cpu"), 1) is None  # nothing left to predict
