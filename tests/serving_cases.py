"""The adapters the serving tests run on, made with peft on the tiny fixture model, and their ΔW as peft computes it.

Cases: plain LoRA, rsLoRA with rank/alpha patterns, a pruned AdaLoRA (one module
of rank 0) — the bundled fixtures — and, made here: ``modules_to_save`` (a full
lm_head replaced by base + low-rank change + noise), an embedding LoRA (peft also
saves the embedding's ``base_layer.weight``), and a rank-64 LoRA on every
projection with decaying, module-dependent spectra (so that a global rank choice
has something to choose). Beside them, ``dora``: a DoRA adapter on q/v (tests/dora_models.py), which export
folds into plain LoRA with the base's weights.
"""

from __future__ import annotations

from pathlib import Path

import torch

from conftest import ADAPTERS, TINY_LLAMA

CASES = ["lora", "rslora", "adalora", "modules_to_save", "embedding", "rank64"]
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _randomize(model: torch.nn.Module, seed: int, decay: bool = False) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i, (name, p) in enumerate(model.named_parameters()):
            if "lora_" not in name:
                continue
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            if decay and "lora_A" in name:  # σ_j ~ 0.8^j, and modules of different size
                p.mul_((0.8 ** torch.arange(p.shape[0], dtype=torch.float32))[:, None] * (1 + i % 5))


def _save(config, out: Path, seed: int, *, decay: bool = False, tweak=None) -> Path:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(TINY_LLAMA), config)
    _randomize(model, seed, decay)
    if tweak is not None:
        tweak(model)
    model.save_pretrained(out)
    return out


def _change_lm_head(model: torch.nn.Module) -> None:
    """A fine-tuned lm_head: the base's plus a rank-3 change plus a little noise (not exactly low-rank)."""
    g = torch.Generator().manual_seed(7)
    w = model.base_model.model.lm_head.modules_to_save["default"].weight
    with torch.no_grad():
        low = torch.randn(w.shape[0], 3, generator=g) @ torch.randn(3, w.shape[1], generator=g) * 0.05
        w.add_(low + 0.002 * torch.randn(w.shape, generator=g))


def build(name: str, tmp: Path) -> Path:
    """The adapter directory of case ``name`` (fixtures are returned as they are)."""
    from peft import LoraConfig

    if name in ("lora", "rslora", "adalora"):
        return ADAPTERS / name
    out = tmp / name
    if name == "modules_to_save":
        return _save(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
                     out, 1, tweak=_change_lm_head)
    if name == "embedding":
        return _save(LoraConfig(r=4, lora_alpha=4, target_modules=["embed_tokens", "q_proj"]), out, 2)
    if name == "rank64":
        return _save(LoraConfig(r=64, lora_alpha=32, target_modules=PROJECTIONS), out, 3, decay=True)
    if name == "dora":
        from dora_models import llama_dora

        llama_dora(TINY_LLAMA, out, targets=["q_proj", "v_proj"], seed=1)
        return out
    raise KeyError(name)


def peft_logprobs(adapter_dir: Path | None, prompts: list[list[int]]) -> list[torch.Tensor]:
    """log-softmax of the next-token logits at every position of each prompt (per prompt: positions × vocab,
    float64): transformers' tiny Llama in float64, with ``adapter_dir`` loaded by peft (None: the base alone)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(TINY_LLAMA, dtype=torch.float64)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    with torch.no_grad():
        return [torch.log_softmax(model.eval()(torch.tensor([p])).logits[0], -1) for p in prompts]


def peft_deltas(adapter_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """peft's merged weights minus the base's, per changed weight (float64), and the base's weights."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(TINY_LLAMA, dtype=torch.float64)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    after = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().state_dict()
    deltas = {k[: -len(".weight")]: after[k] - before[k] for k in before if not torch.equal(after[k], before[k])}
    return deltas, before
