"""LoRA on mixture-of-experts expert tensors (peft's ``target_parameters``), made by peft 0.21.2 on tiny
gpt-oss (3-D expert tensors stored transposed), Mixtral and Qwen2-MoE (saved one expert at a time by
transformers 5.23), merged by loratools and compared with peft's ``merge_and_unload``."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from helpers import peft_merged, state
from loratools import read_adapter
from loratools.io import ModelReader
from loratools.merge.jobs import merge_model, unmerge_model, verify_merge

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TOL = 1e-6
EXPERTS = 3
SMALL = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, vocab_size=20,
             num_experts_per_tok=2)


def _gpt_oss(path: Path) -> None:
    cfg = transformers.GptOssConfig(**SMALL, intermediate_size=8, num_local_experts=EXPERTS, head_dim=8,
                                    layer_types=["full_attention"])
    transformers.GptOssForCausalLM(cfg).save_pretrained(path)


def _mixtral(path: Path) -> None:
    cfg = transformers.MixtralConfig(**SMALL, intermediate_size=8, num_local_experts=EXPERTS, head_dim=8)
    transformers.MixtralForCausalLM(cfg).save_pretrained(path)


def _qwen2_moe(path: Path) -> None:
    cfg = transformers.Qwen2MoeConfig(**SMALL, intermediate_size=8, moe_intermediate_size=4,
                                      shared_expert_intermediate_size=8, num_experts=EXPERTS)
    transformers.Qwen2MoeForCausalLM(cfg).save_pretrained(path)


MODELS = {"gpt_oss": _gpt_oss, "mixtral": _mixtral, "qwen2_moe": _qwen2_moe}


@pytest.fixture(scope="module", params=sorted(MODELS))
def moe(request, tmp_path_factory) -> tuple[str, Path, Path]:
    """(model type, base, a peft adapter on q_proj and both expert tensors with random factors)."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        MODELS[request.param](root / "base")
        model = transformers.AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.float32)
        pm = get_peft_model(model, LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj"],
                                              target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for _, p in pm.named_parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        pm.save_pretrained(root / "ad")
    return request.param, root / "base", root / "ad"


def _load(path: Path) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _same(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sa, sb = state(a), state(b)
    assert set(sa) == set(sb)
    return max(float((sa[k] - sb[k]).abs().max()) for k in sa)


def test_read_and_inspect_per_expert(moe, cli):
    _, _, ad_dir = moe
    ad = read_adapter(ad_dir)
    experts = [m for m in ad.modules.values() if m.kind == "experts"]
    assert len(experts) == 2 and all(m.experts == EXPERTS and m.rank == 2 for m in experts)
    r = cli("inspect", ad_dir, "--json")
    assert r.returncode == 0, r.stderr
    names = [layer["name"] for layer in json.loads(r.stdout)["layers"]]
    assert sum("[expert " in n for n in names) == 2 * EXPERTS and len(names) == 2 * EXPERTS + 1


def test_merge_equals_peft_and_unmerge_and_verify(moe, tmp_path):
    _, base, ad_dir = moe
    ref = peft_merged(base, ad_dir)
    ad = read_adapter(ad_dir)
    report = merge_model(base, [ad], tmp_path / "m", device="cpu", verify=True)
    assert report.adapted >= 3
    ours = _load(tmp_path / "m")
    assert _same(ours, ref) < TOL
    assert _same(ours, _load(base)) > 1e-3  # the experts really changed
    ids = torch.tensor([[1, 5, 7, 2, 11]])
    with torch.no_grad():
        assert float((ours(ids).logits - ref(ids).logits).abs().max()) < 1e-5
    assert verify_merge(base, [ad], tmp_path / "m", device="cpu").ok
    unmerge_model(tmp_path / "m", [ad], tmp_path / "u", device="cpu")
    b, u = ModelReader(base), ModelReader(tmp_path / "u")
    assert max(float((u.get(k) - b.get(k)).abs().max()) for k in b.spans) < TOL


def test_convert_to_peft_and_loratools_and_refused_elsewhere(moe, tmp_path, cli):
    _, base, ad_dir = moe
    ref = peft_merged(base, ad_dir)
    for to in ("peft", "loratools"):
        out = tmp_path / f"out-{to}"
        r = cli("convert", ad_dir, "-o", out, "--to", to)
        assert r.returncode == 0, r.stderr
        merge_model(base, [read_adapter(out)], tmp_path / f"m-{to}", device="cpu")
        assert _same(_load(tmp_path / f"m-{to}"), ref) < TOL
    assert _same(peft_merged(base, tmp_path / "out-peft"), ref) < TOL  # peft loads what loratools wrote
    r = cli("convert", ad_dir, "-o", tmp_path / "k.safetensors", "--to", "kohya")
    assert r.returncode == 2 and "target_parameters" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    r = cli("resize", ad_dir, "-o", tmp_path / "small", "--rank", "1")
    assert r.returncode == 2 and "expert" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "k.safetensors").exists() and not (tmp_path / "small").exists()


def test_an_expert_lora_the_base_cannot_hold_is_refused(moe, tmp_path, cli):
    _, _, ad_dir = moe
    r = cli("merge", "fixtures/tiny-llama", ad_dir, "-o", tmp_path / "m")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "m").exists()


def test_dora_on_an_experts_parameter_is_refused_in_one_line():
    """peft 0.21.2 has no DoRA for target_parameters (ParamWrapper), so there is no merge to match."""
    from loratools.adapter import Adapter, Module
    from loratools.config import AdapterConfig
    from loratools.errors import UnsupportedConfigError
    from loratools.merge.plan import AdapterInput, plan_merge

    n, r, out, inp = 2, 1, 3, 4
    m = Module(A=torch.ones(n * r, inp), B=torch.ones(out, n * r), alpha=1.0, scale=1.0, kind="experts", experts=n,
               magnitude=torch.ones(out))
    ad = Adapter({"model.layers.0.mlp.experts.gate_up_proj": m}, AdapterConfig(method="lora"))
    with pytest.raises(UnsupportedConfigError, match="use_dora") as e:
        plan_merge({"model.layers.0.mlp.experts.gate_up_proj": ("F32", (n, out, inp))}, [AdapterInput(ad)])
    assert "\n" not in str(e.value)
