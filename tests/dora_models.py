"""DoRA adapters made by real peft 0.21.2 on small models, for the DoRA tests.

Each builder saves a base model directory (``model.safetensors``) and a PEFT DoRA
adapter trained to a random point (lora_A, lora_B ~ N(0, σ), m = ‖W0 + s·BA‖·(1 + noise)),
and returns peft's own ``merge_and_unload`` state dict as the reference.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file


def randomise(pm: torch.nn.Module, *, seed: int = 0, std: float = 0.1) -> None:
    """Move every LoRA factor and magnitude away from its initialisation, deterministically."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_A" in n or "lora_B" in n or "lora_embedding" in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif "lora_magnitude_vector" in n:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))


def merged_state(pm: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in pm.merge_and_unload(safe_merge=True).state_dict().items()}


def llama_dora(base: Path, out: Path, *, targets: list[str], dtype: torch.dtype = torch.float32,
               seed: int = 0) -> dict[str, torch.Tensor]:
    import transformers
    from peft import LoraConfig, get_peft_model

    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True))
    randomise(pm, seed=seed)
    pm.save_pretrained(out, save_embedding_layers=False)
    return merged_state(pm)


def gpt2_dora(tmp: Path, *, dtype: torch.dtype = torch.float32) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """GPT-2 (Conv1D, fan_in_fan_out) with DoRA on c_attn, c_proj and c_fc."""
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=16)
    transformers.GPT2LMHeadModel(cfg).to(dtype).save_pretrained(tmp / "gpt2")
    model = transformers.GPT2LMHeadModel.from_pretrained(tmp / "gpt2", dtype=dtype)
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"],
                                          fan_in_fan_out=True, use_dora=True))
    randomise(pm, seed=1)
    pm.save_pretrained(tmp / "ad")
    return tmp / "gpt2", tmp / "ad", merged_state(pm)


class Small(torch.nn.Module):
    """A model with a Conv2d and an Embedding, the two other layer kinds peft's DoRA supports."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.emb = torch.nn.Embedding(50, 12)


def small_dora(tmp: Path, *, dtype: torch.dtype = torch.float32) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """Conv2d and Embedding DoRA on :class:`Small`; the base saved as ``model.safetensors``."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(2)
    model = Small().to(dtype)
    (tmp / "small").mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "small" / "model.safetensors"))
    pm = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["conv", "emb"], use_dora=True))
    randomise(pm, seed=2, std=0.3)
    pm.save_pretrained(tmp / "ad", save_embedding_layers=False)
    return tmp / "small", tmp / "ad", merged_state(pm)
