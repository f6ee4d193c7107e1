"""``merge PIPELINE ADAPTER --component NAME``: one model of a diffusers pipeline folder, against diffusers' fuse.

The pipeline folder is what diffusers' ``save_pretrained`` writes per model (``unet/config.json`` +
``diffusion_pytorch_model.safetensors``, sharded with ``diffusion_pytorch_model.safetensors.index.json`` when
large; ``text_encoder/model.safetensors``). The reference is diffusers 0.42.1 loading the same LoRA file into the
same model and fusing it (``fuse_lora``), in float64; the merged folder must load back with ``from_pretrained``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from safetensors.torch import save_file

from test_kohya_sdxl import XL, _clip, _kohya_file, _unet  # the tiny SDXL models and kohya file recipe

from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.loaders.lora_base import fuse_text_encoder_lora  # noqa: E402
from transformers import CLIPTextModel  # noqa: E402


def _pipeline(root: Path, *, shard: bool) -> Path:
    """The U-Net (sharded when ``shard``) and first text encoder of a pipeline folder, plus a side file."""
    _unet().save_pretrained(str(root / "unet"), max_shard_size="20KB" if shard else "10GB")
    _clip(CLIPTextModel, 1).save_pretrained(str(root / "text_encoder"))
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    return root


def _fused(path: Path, component: str) -> dict[str, torch.Tensor]:
    """diffusers' own merge of the file's ``component`` LoRA, float64."""
    unet = _unet().double()
    sd, alphas = XL.lora_state_dict(str(path), unet_config=unet.config)
    if component == "unet":
        XL.load_lora_into_unet(sd, alphas, unet)
        unet.fuse_lora()
        model: torch.nn.Module = unet
    else:
        model = _clip(CLIPTextModel, 1).double()
        XL.load_lora_into_text_encoder(sd, alphas, model, prefix="text_encoder")
        fuse_text_encoder_lora(model)
    return {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if "lora_" not in k}


@pytest.mark.parametrize("shard", [False, True], ids=["single", "sharded"])
def test_unet_of_a_pipeline_merges_as_diffusers_fuses(tmp_path: Path, shard: bool) -> None:
    pipe = _pipeline(tmp_path / "pipe", shard=shard)
    stale = pipe / "unet" / "diffusion_pytorch_model.fp16.safetensors"  # a variant: the unmerged weights again
    save_file({"conv_in.weight": torch.zeros(1)}, str(stale))
    lora = _kohya_file(tmp_path / "lora.safetensors", sgm=True)
    done = run_cli("merge", pipe, lora, "--component", "unet", "-o", tmp_path / "unet-merged")
    assert done.returncode == 0, done.stderr
    # the text encoders' LoRAs were not merged, and the run says so
    assert "text_encoder, text_encoder_2" in done.stderr and "--component" in done.stderr
    out = tmp_path / "unet-merged"
    index = "diffusion_pytorch_model.safetensors.index.json"
    assert (out / index).is_file() == shard and (out / "config.json").is_file()
    # the same files, less the variant, which would still hold the unmerged weights
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (pipe / "unet").iterdir() if p != stale)
    merged = UNet2DConditionModel.from_pretrained(str(out)).state_dict()
    base = _unet().state_dict()
    want = _fused(lora, "unet")
    changed = {k for k in base if not torch.equal(merged[k], base[k])}
    assert changed == {k for k in base if not torch.equal(want[k].float(), base[k].double().float())}
    assert len(changed) > 40
    for k in changed:
        d, ref = (merged[k].double() - base[k].double()), want[k] - base[k].double()
        assert torch.linalg.norm(d - ref) <= 1e-5 * torch.linalg.norm(ref), k


def test_text_encoder_of_a_pipeline_merges_as_diffusers_fuses(tmp_path: Path) -> None:
    pipe = _pipeline(tmp_path / "pipe", shard=False)
    lora = _kohya_file(tmp_path / "lora.safetensors", sgm=True)
    done = run_cli("merge", pipe, lora, "--component", "text_encoder", "-o", tmp_path / "te", "--verify")
    assert done.returncode == 0, done.stderr
    assert "text_encoder_2, unet" in done.stderr
    merged = CLIPTextModel.from_pretrained(str(tmp_path / "te")).state_dict()
    base, want = _clip(CLIPTextModel, 1).state_dict(), _fused(lora, "text_encoder")
    changed = [k for k in base if not torch.equal(merged[k], base[k])]
    assert len(changed) == 6  # layer 1: q, k, v, out_proj, fc1, fc2
    for k in changed:
        d, ref = merged[k].double() - base[k].double(), want[k] - base[k].double()
        assert torch.linalg.norm(d - ref) <= 1e-5 * torch.linalg.norm(ref), k


def test_component_the_pipeline_lacks_is_refused_naming_its_models(tmp_path: Path) -> None:
    pipe = _pipeline(tmp_path / "pipe", shard=False)
    lora = _kohya_file(tmp_path / "lora.safetensors", sgm=True)
    done = run_cli("merge", pipe, lora, "--component", "transformer", "-o", tmp_path / "out")
    assert done.returncode == 2 and "text_encoder, unet" in done.stderr and "--component" in done.stderr
    assert "\n" not in done.stderr.strip() and not (tmp_path / "out").exists()


def test_a_pipeline_lora_without_component_names_the_choice(tmp_path: Path) -> None:
    """A base that is none of the file's components (its folder name says none) is refused, not half-merged."""
    pipe = _pipeline(tmp_path / "pipe", shard=False)
    (pipe / "unet").rename(pipe / "my-unet")
    lora = _kohya_file(tmp_path / "lora.safetensors", sgm=True)
    done = run_cli("merge", pipe / "my-unet", lora, "-o", tmp_path / "out")
    assert done.returncode == 2 and "--component" in done.stderr and "text_encoder_2, unet" in done.stderr
    assert not (tmp_path / "out").exists()


def test_diffusers_pipeline_lora_merges_into_its_unet_folder(tmp_path: Path) -> None:
    """``save_lora_weights``' own file, base folder ``unet/`` given directly: the folder names the component."""
    from safetensors.torch import load_file
    from test_diffusers_format import _diffusers_deltas, _save
    from test_diffusers_format import _unet as sd_unet

    lora = _save(tmp_path / "src", metadata=True)
    sd_unet().save_pretrained(str(tmp_path / "pipe" / "unet"))
    done = run_cli("merge", tmp_path / "pipe" / "unet", lora, "-o", tmp_path / "merged")
    assert done.returncode == 0, done.stderr
    assert "text_encoder LoRAs are not in this model" in done.stderr.replace("\n", " ")
    w0 = load_file(str(tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.safetensors"))
    w1 = load_file(str(tmp_path / "merged" / "diffusion_pytorch_model.safetensors"))
    want = {k[len("unet."):]: v for k, v in _diffusers_deltas(lora).items() if k.startswith("unet.")}
    assert {k[: -len(".weight")] for k in w0 if not torch.equal(w0[k], w1[k])} == set(want)
    for name, ref in want.items():
        d = (w1[f"{name}.weight"] - w0[f"{name}.weight"]).double()
        assert torch.linalg.norm(d - ref) <= 1e-6 * torch.linalg.norm(ref), name


def test_a_pipeline_folder_without_component_refuses_a_part_it_has_no_model_for(tmp_path: Path) -> None:
    """Without --component the whole pipeline is merged (tests/test_pipeline_merge.py); this one has no
    text_encoder_2/ for the file's text_encoder_2 LoRA, so it is refused naming its models and --partial."""
    pipe = _pipeline(tmp_path / "pipe", shard=False)
    lora = _kohya_file(tmp_path / "lora.safetensors", sgm=True)
    done = run_cli("merge", pipe, lora, "-o", tmp_path / "out")
    message = done.stderr.replace("\n", " ")
    assert done.returncode == 2 and "text_encoder_2" in message and "(its models: text_encoder, unet)" in message
    assert "--partial" in message and not (tmp_path / "out").exists()


def _flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=4,
                                  num_attention_heads=2, joint_attention_dim=8, pooled_projection_dim=8,
                                  axes_dims_rope=(0, 2, 2)).eval()


def test_flux_transformer_of_a_pipeline_merges_as_diffusers_fuses(tmp_path: Path) -> None:
    """A Flux pipeline LoRA (``transformer.`` keys, saved by ``FluxLoraLoaderMixin.save_lora_weights`` with its
    metadata) merged into ``transformer/`` equals diffusers' ``load_lora_weights`` + ``fuse_lora``."""
    from diffusers.loaders import FluxLoraLoaderMixin as Flux
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    model = _flux()
    model.save_pretrained(str(tmp_path / "pipe" / "transformer"))
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    model.add_adapter(LoraConfig(r=2, lora_alpha=3, target_modules=["to_q", "to_k", "add_q_proj", "proj_out",
                                                                     "ff.net.0.proj"], init_lora_weights=False))
    Flux.save_lora_weights(str(tmp_path / "lora"), transformer_lora_layers=get_peft_model_state_dict(model),
                           transformer_lora_adapter_metadata=model.peft_config["default"].to_dict())
    lora = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    done = run_cli("merge", tmp_path / "pipe", lora, "--component", "transformer", "-o", tmp_path / "merged",
                   "--precision", "float64")
    assert done.returncode == 0, done.stderr
    ref = _flux().double()
    base = {k: v.clone() for k, v in ref.state_dict().items()}
    loaded = Flux.lora_state_dict(str(lora), return_lora_metadata=True)  # (state dict[, alphas], metadata)
    Flux.load_lora_into_transformer(loaded[0], None, transformer=ref, metadata=loaded[-1])
    ref.fuse_lora()
    want = {k.replace(".base_layer.", "."): v for k, v in ref.state_dict().items() if "lora_" not in k}
    from safetensors.torch import load_file

    got = load_file(str(tmp_path / "merged" / "diffusion_pytorch_model.safetensors"))
    changed = {k for k in base if not torch.equal(got[k].double(), base[k])}
    assert changed == {k for k in base if not torch.equal(want[k], base[k])} and len(changed) >= 5
    for k in changed:
        assert torch.allclose(got[k].double(), want[k], rtol=2**-23, atol=1e-9), k
