"""check/export --for RUNTIME and eval on inputs a user could have: configs vLLM reads differently from loratools.

vLLM 0.32.0 reads an adapter's config into ``PEFTHelper`` (``vllm/lora/peft_helper.py``): ``r``, ``lora_alpha`` and
``target_modules`` are required fields, ``bias`` must be the string "none", and ``validate_legal`` bounds
``max(r, *rank_pattern.values())`` by ``--max-lora-rank`` — the config's ranks, not the tensors'. Where
.venv-vllm is installed, vLLM's own ``PEFTHelper`` is the reference for every verdict below.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from helpers import VLLM_PY, vllm_skip_reason
from loratools.errors import InvalidOptionError
from loratools.formats import read_adapter
from loratools.serve.check import check_file
from loratools.serve.export import export_adapter
from serving_cases import peft_deltas

TINY = Path(__file__).resolve().parent.parent / "fixtures" / "tiny-llama"


def _peft_lora(out: Path, **config: object) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(TINY), LoraConfig(**config))  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    model.save_pretrained(out)
    return out


def _edited(src: Path, out: Path, **changes: object) -> Path:
    """A copy of ``src`` whose config has ``changes`` (a value of ``...`` removes the field)."""
    shutil.copytree(src, out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    for key, value in changes.items():
        if value is ...:
            cfg.pop(key)
        else:
            cfg[key] = value
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    """name → (adapter directory): r = 64 in the config but every module rank 8 through rank_pattern; a plain
    rank-8 LoRA; copies of it without r, lora_alpha or target_modules, with "bias": null, and with a rank_pattern
    entry of rank 16 for o_proj, which it does not adapt."""
    tmp = tmp_path_factory.mktemp("hardening")
    plain = _peft_lora(tmp / "plain", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    out = {"plain": plain,
           "r64_patterns_8": _peft_lora(tmp / "r64", r=64, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                        rank_pattern={"q_proj": 8, "v_proj": 8})}
    for name, change in {"no_r": {"r": ...}, "no_lora_alpha": {"lora_alpha": ...},
                         "no_target_modules": {"target_modules": ...}, "bias_null": {"bias": None},
                         "stray_pattern": {"rank_pattern": {"o_proj": 16}}}.items():
        out[name] = _edited(plain, tmp / name, **change)
    return out


#: adapter → (vLLM 0.32 loads it at --max-lora-rank 8, the rule check names when it does not)
VERDICTS = {"plain": (True, None), "r64_patterns_8": (False, "max-lora-rank"), "no_r": (False, "peft-directory"),
            "no_lora_alpha": (False, "peft-directory"), "no_target_modules": (False, "peft-directory"),
            "bias_null": (False, "peft-features"), "stray_pattern": (False, "max-lora-rank")}


@pytest.mark.parametrize("name", list(VERDICTS))
def test_check_counts_what_vllm_reads_from_the_config(adapters, name: str) -> None:
    """The config's r and rank_pattern bound --max-lora-rank; a missing required field or a null bias is refused."""
    loads, rule = VERDICTS[name]
    report = check_file(adapters[name], "vllm", max_lora_rank=8, runtime_version="0.32.0")
    assert report.ok == loads
    assert [f.rule.id for f in report.findings if f.counts] == ([] if rule is None else [rule])


def test_check_suggests_the_max_lora_rank_the_config_needs(adapters) -> None:
    notes = check_file(adapters["r64_patterns_8"], "vllm", runtime_version="0.32.0").notes
    assert any("--max-lora-rank 64" in n and "declares 64" in n for n in notes), notes
    # SGLang reads `r` (not rank_pattern) against its --max-lora-rank
    sglang = check_file(adapters["r64_patterns_8"], "sglang", max_lora_rank=8)
    assert "max-lora-rank" in [f.rule.id for f in sglang.findings if f.counts]


def test_a_bool_is_not_a_max_lora_rank(adapters) -> None:
    """True == 1 is one of vLLM's choices: a bool from a JSON or API caller must not pass as rank 1."""
    with pytest.raises(InvalidOptionError, match="max_lora_rank"):
        check_file(adapters["plain"], "vllm", max_lora_rank=True)


def test_export_rewrites_the_config_so_vllm_loads_the_same_delta(tmp_path: Path, adapters) -> None:
    """Exported: r = the modules' rank, bias "none"; peft's merge of the exported directory is the source's ΔW."""
    for name in ("r64_patterns_8", "bias_null"):
        out = tmp_path / name
        export_adapter(adapters[name], out, runtime="vllm", max_lora_rank=8)
        cfg = json.loads((out / "adapter_config.json").read_text())
        assert cfg["r"] == 8 and not cfg["rank_pattern"] and cfg["bias"] == "none"
        assert check_file(out, "vllm", max_lora_rank=8, runtime_version="0.32.0").ok
        got = peft_deltas(out)[0]
        src = read_adapter(adapters[name])
        assert {f"{n}" for n in src.modules} == set(got)
        for n, m in src.items():
            want = m.delta(dtype=torch.float64)
            assert float((got[n] - want).norm() / want.norm()) < 1e-6, n


_PROBE = """
import json, sys
from vllm.config.lora import LoRAConfig
from vllm.lora.peft_helper import PEFTHelper
out = {}
for path in sys.argv[1:]:
    try:
        PEFTHelper.from_local_dir(path, None).validate_legal(LoRAConfig(max_lora_rank=8))
        out[path] = None
    except Exception as e:
        out[path] = str(e)
print(json.dumps(out))
"""


@pytest.mark.skipif(vllm_skip_reason() is not None, reason=str(vllm_skip_reason()))
def test_vllm_own_config_reader_agrees_with_check(tmp_path: Path, adapters) -> None:
    """vLLM 0.32.0's PEFTHelper (one process, ~12 s) refuses exactly the adapters check refuses, and loads
    every export of them."""
    exported = {}
    for name in ("r64_patterns_8", "bias_null"):
        exported[name] = tmp_path / name
        export_adapter(adapters[name], exported[name], runtime="vllm", max_lora_rank=8)
    paths = [str(p) for p in (*adapters.values(), *exported.values())]
    r = subprocess.run([str(VLLM_PY), "-c", _PROBE, *paths], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    refused = json.loads(r.stdout.strip().splitlines()[-1])
    for name, path in adapters.items():
        assert (refused[str(path)] is None) == VERDICTS[name][0], (name, refused[str(path)])
    assert all(refused[str(p)] is None for p in exported.values())


@pytest.mark.parametrize("args,what", [
    (["--max-examples", "-1"], "--max-examples"), (["--max-examples", "0"], "--max-examples"),
    (["--stack", "vllm", "--max-lora-rank", "0"], "--max-lora-rank"),
    (["--stack", "vllm", "--vllm-logprobs", "0"], "--vllm-logprobs")])
def test_eval_refuses_counts_before_any_model_loads(tmp_path: Path, cli, adapters, args: list[str],
                                                    what: str) -> None:
    """A negative --max-examples would slice off the last examples; vLLM's option errors would come only
    after its engine started (minutes), or leave no log-prob to compare."""
    data = tmp_path / "d.txt"
    data.write_text("the quick brown fox jumps over the lazy dog\n")
    res = cli("eval", TINY, adapters["plain"], "--data", data, *args)
    assert res.returncode == 2 and res.stderr.startswith("loratools: error:") and what in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_eval_vllm_stack_refuses_several_adapters(tmp_path: Path, cli, adapters) -> None:
    """The reference adds every ADAPTER's ΔW; the vllm stack would serve the first one only."""
    data = tmp_path / "d.txt"
    data.write_text("the quick brown fox jumps over the lazy dog\n")
    res = cli("eval", TINY, adapters["plain"], adapters["r64_patterns_8"], "--data", data, "--stack", "vllm")
    assert res.returncode == 2 and "vllm:DIR" in res.stderr and len(res.stderr.strip().splitlines()) == 1
