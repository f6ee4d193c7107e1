"""``convert --base B`` writes only modules that are weights of B, or nothing (issue 25).

A file whose module names match no weight of its base loads as a no-op (peft warns and adapts nothing) or not at
all: with ``--base`` every output module's ``NAME.weight`` must be in B, or the run exits 2 naming the first
unmatched modules and how many. The cases are the ones that used to exit 0: a Llama adapter "converted against" a
U-Net, a kohya file whose flattened names the base did not map back, a ComfyUI file against a diffusers U-Net; and
the right ones must still pass (kohya SD with the U-Net as ``--component`` and base, kohya LLM keys mapped back by
their base, ComfyUI against its checkpoint). The files are built as ``test_kohya_sdxl``/``test_comfyui`` build them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file, save_file

from loratools.formats import read_with_base

pytest.importorskip("diffusers")
from test_comfyui import _checkpoint, _lora_save  # noqa: E402
from test_kohya_sdxl import _clip, _kohya_file, _unet  # noqa: E402
from transformers import CLIPTextModel  # noqa: E402

LLAMA, LLAMA_LORA = Path("fixtures/tiny-llama"), Path("fixtures/adapters/lora")


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A diffusers pipeline folder with the tiny SDXL-shaped U-Net and a CLIP text encoder."""
    root = tmp_path_factory.mktemp("pipe")
    _unet().save_pretrained(str(root / "unet"))
    _clip(CLIPTextModel, 1).save_pretrained(str(root / "text_encoder"))
    return root


def _refused(tmp_path: Path, src: Path, base: Path, *extra: object, to: str = "peft") -> str:
    out = tmp_path / "refused"
    r = run_cli("convert", src, "-o", out, "--to", to, "--base", base, *extra)
    assert r.returncode == 2, r.stdout + r.stderr
    assert not out.exists() and not list(tmp_path.glob(".refused*"))
    assert len(r.stderr.strip().splitlines()) == 1
    return r.stderr


def _written(tmp_path: Path, src: Path, base: Path, *extra: object, to: str = "peft") -> Path:
    out = tmp_path / "out"
    r = run_cli("convert", src, "-o", out, "--to", to, "--base", base, *extra)
    assert r.returncode == 0, r.stderr
    return out


def _peft_modules(out: Path) -> set[str]:
    keys = load_file(str(out / "adapter_model.safetensors"))
    return {k.removeprefix("base_model.model.").split(".lora_")[0] for k in keys}


@pytest.mark.parametrize("to", ["peft", "kohya"])
def test_a_llama_adapter_against_a_unet_is_refused_naming_modules_and_count(tmp_path: Path, pipe: Path,
                                                                            to: str) -> None:
    err = _refused(tmp_path, LLAMA_LORA, pipe / "unet", to=to)
    assert "8 of 8 modules match no weight of --base" in err and "model.layers.0.self_attn.q_proj" in err
    assert "and 5 more" in err and "--component" in err and "leave --base out" in err


def test_the_llama_adapter_against_its_own_base_still_converts(tmp_path: Path) -> None:
    out = _written(tmp_path, LLAMA_LORA, LLAMA)
    weights = load_file(str(LLAMA / "model.safetensors"))
    assert _peft_modules(out) and all(f"{n}.weight" in weights for n in _peft_modules(out))


def _foreign_kohya_llm(path: Path) -> Path:
    """A kohya file of the Llama adapter as other tools write it: flattened keys, no loratools names metadata."""
    t = {}
    for k, v in load_file(str(LLAMA_LORA / "adapter_model.safetensors")).items():
        name, _, part = k.removeprefix("base_model.model.").partition(".lora_")
        key = "lora_te_" + name.replace(".", "_")
        t[f"{key}.lora_{'down' if part.startswith('A') else 'up'}.weight"] = v
        t[f"{key}.alpha"] = torch.tensor(8.0)
    save_file(t, str(path))
    return path


def test_kohya_flattened_names_the_base_does_not_map_are_refused(tmp_path: Path, pipe: Path) -> None:
    src = _foreign_kohya_llm(tmp_path / "k.safetensors")
    err = _refused(tmp_path, src, pipe / "unet")
    assert "lora_te_model_layers_0_self_attn_q_proj" in err and "of 8 modules" in err


def test_kohya_flattened_names_mapped_by_their_base_still_convert(tmp_path: Path) -> None:
    src = _foreign_kohya_llm(tmp_path / "k.safetensors")
    out = _written(tmp_path, src, LLAMA)
    assert "model.layers.0.self_attn.q_proj" in _peft_modules(out)


def test_kohya_sd_unet_part_against_its_unet_converts_and_against_the_text_encoder_is_refused(
        tmp_path: Path, pipe: Path) -> None:
    src = _kohya_file(tmp_path / "sdxl.safetensors", sgm=True)
    out = _written(tmp_path, src, pipe / "unet", "--component", "unet")
    unet_keys = load_file(str(pipe / "unet" / "diffusion_pytorch_model.safetensors"))
    names = _peft_modules(out)
    assert len(names) > 50 and all(f"{n}.weight" in unet_keys for n in names)
    err = _refused(tmp_path, src, pipe / "text_encoder", "--component", "unet")
    assert "match no weight of --base" in err


def test_comfyui_file_converts_to_the_names_of_a_diffusers_unet_and_of_its_checkpoint(
        tmp_path: Path, pipe: Path) -> None:
    """ComfyUI's SGM names become the diffusers U-Net's own module names against ``unet/``, and stay the
    checkpoint's against a single-file checkpoint: either way every module names a weight of that base."""
    src = _lora_save(tmp_path / "comfy.safetensors", full=False, bias_diff=False)
    unet_keys = set(load_file(str(pipe / "unet" / "diffusion_pytorch_model.safetensors")))
    (tmp_path / "u").mkdir()
    out = _written(tmp_path / "u", src, pipe / "unet")
    assert _peft_modules(out) and all(f"{n}.weight" in unet_keys for n in _peft_modules(out))
    ckpt = _checkpoint(tmp_path / "ckpt.safetensors")
    out = _written(tmp_path, src, ckpt)
    weights = load_file(str(ckpt))
    assert all(f"{n}.weight" in weights for n in _peft_modules(out))


def test_a_tied_output_head_is_a_weight_of_its_base(tmp_path: Path) -> None:
    """peft adapts ``lm_head`` of a model that stores only the input embedding; ``merge`` unties it."""
    from peft import LoraConfig

    from helpers import peft_adapter, tiny_llama_model
    from loratools.formats.base import load_base, unmatched_modules

    base = tiny_llama_model(tmp_path / "tied", tie_word_embeddings=True)
    assert "lm_head.weight" not in load_file(str(base / "model.safetensors"))
    ad = peft_adapter(base, tmp_path / "ad", LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    adapter, known, _ = read_with_base(ad, base)
    assert known is not None and "lm_head" in adapter.modules and unmatched_modules(adapter, known) == []
    assert unmatched_modules(adapter, load_base(LLAMA)) == []  # untied: lm_head.weight is there
