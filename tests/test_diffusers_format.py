"""diffusers pipeline LoRA files (``pytorch_lora_weights.safetensors``), against diffusers 0.42.1 itself.

The producer is diffusers' own ``save_lora_weights``; the reference ΔW is diffusers' own fuse of a loaded
copy (weight after − before), per module of every component, within 1e-6 relative.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import weight_deltas
from loratools.errors import InvalidOptionError, NotAnAdapterError
from loratools.formats import BaseModel, detect_format, read_adapter, read_with_base

diffusers = pytest.importorskip("diffusers", reason="diffusers 0.42.1 is the producer (pip install --no-deps diffusers)")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.loaders import StableDiffusionLoraLoaderMixin as Mixin  # noqa: E402
from diffusers.loaders.lora_base import fuse_text_encoder_lora  # noqa: E402
from peft import LoraConfig  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402


def _unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(block_out_channels=(4, 8), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=8,
                                norm_num_groups=2).eval()


def _text_encoder() -> CLIPTextModel:
    torch.manual_seed(1)
    return CLIPTextModel(CLIPTextConfig(bos_token_id=0, eos_token_id=2, hidden_size=8, intermediate_size=16,
                                        num_attention_heads=2, num_hidden_layers=2, pad_token_id=1,
                                        vocab_size=50)).eval()


UNET_CFG = dict(r=4, lora_alpha=6, target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1"],
                rank_pattern={"to_k": 2}, alpha_pattern={"to_v": 3.0}, init_lora_weights=False)
TE_CFG = dict(r=2, lora_alpha=5, target_modules=["q_proj", "v_proj", "fc1"], use_rslora=True, init_lora_weights=False)


def _save(d: Path, *, metadata: bool) -> Path:
    unet, te = _unet(), _text_encoder()
    torch.manual_seed(2)
    unet.add_adapter(LoraConfig(**UNET_CFG))  # type: ignore[arg-type]
    te.add_adapter(LoraConfig(**TE_CFG))  # type: ignore[arg-type]
    extra = {}
    if metadata:
        extra = dict(unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
                     text_encoder_lora_adapter_metadata=te.peft_config["default"].to_dict())
    Mixin.save_lora_weights(str(d), unet_lora_layers=get_peft_model_state_dict(unet),
                            text_encoder_lora_layers=get_peft_model_state_dict(te), **extra)
    return d / "pytorch_lora_weights.safetensors"


def _diffusers_deltas(path: Path) -> dict[str, torch.Tensor]:
    """ΔW per module as diffusers applies it: load into fresh copies, fuse, subtract."""
    sd, alphas, meta = Mixin.lora_state_dict(str(path), return_lora_metadata=True)
    unet, te = _unet(), _text_encoder()
    before = {"unet": {k: v.clone() for k, v in unet.state_dict().items()},
              "text_encoder": {k: v.clone() for k, v in te.state_dict().items()}}
    Mixin.load_lora_into_unet(sd, alphas, unet, metadata=meta)
    Mixin.load_lora_into_text_encoder(sd, alphas, te, metadata=meta)
    unet.fuse_lora()
    fuse_text_encoder_lora(te)
    return weight_deltas({"unet": unet, "text_encoder": te}, before)


def _whole(name: str) -> str:
    """A module's name in the whole adapter: CLIP's with its ``text_model.`` level (transformers 5 has none)."""
    from loratools.formats.kohya_sd import clip_name

    comp, _, module = name.partition(".")
    return f"{comp}.{clip_name(module)}"


@pytest.mark.parametrize("metadata", [True, False])
def test_deltas_match_diffusers_fuse(tmp_path: Path, metadata: bool) -> None:
    path = _save(tmp_path, metadata=metadata)
    assert detect_format(path) == "diffusers"
    adapter = read_adapter(path)
    want = {_whole(k): v for k, v in _diffusers_deltas(path).items()}
    assert any(k.startswith("text_encoder.text_model.") for k in want)
    assert set(adapter.modules) == set(want)
    assert any(m.kind == "conv" for m in adapter.modules.values())
    assert "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q" in adapter.modules
    for name, m in adapter.items():
        got = m.delta().double()
        assert torch.linalg.norm(got - want[name]) <= 1e-6 * torch.linalg.norm(want[name]), name
    if metadata:  # rank_pattern, alpha_pattern and rsLoRA all reached the scale
        scales = {m.scale for m in adapter.modules.values()}
        assert {6 / 4, 6 / 2, 3 / 4, 5 / 2 ** 0.5} <= scales
    else:
        assert {m.scale for m in adapter.modules.values()} == {1.0}


@pytest.mark.parametrize("metadata", [True, False])
def test_written_again_as_diffusers_it_fuses_the_same(tmp_path: Path, metadata: bool) -> None:
    """rank_pattern, alpha_pattern and rsLoRA (or alpha = r without metadata) survive loratools' own writer, as
    diffusers' fuse of the rewritten file shows; its text encoder loads into transformers 5's CLIPTextModel."""
    from loratools.convert import convert_file

    path = _save(tmp_path / "src", metadata=metadata)
    out = convert_file(path, tmp_path / "out" / "pytorch_lora_weights.safetensors", to="diffusers")
    assert out.source_format == "diffusers" and out.max_error <= 1e-6
    want, got = _diffusers_deltas(path), _diffusers_deltas(out.output)
    assert set(got) == set(want)
    for name, d in want.items():
        assert torch.linalg.norm(got[name] - d) <= 1e-6 * torch.linalg.norm(d), name


def test_convert_component_to_peft_is_peft_of_that_model(tmp_path: Path) -> None:
    from loratools.convert import convert_file

    path = _save(tmp_path / "src", metadata=True)
    whole = read_adapter(path)
    result = convert_file(path, tmp_path / "unet-lora", to="peft", component="unet")
    assert result.source_format == "diffusers" and result.max_error <= 1e-6
    back = read_adapter(tmp_path / "unet-lora")
    assert set(back.modules) == {n[len("unet."):] for n in whole.modules if n.startswith("unet.")}
    for name, m in back.items():
        assert torch.allclose(m.delta(), whole.modules[f"unet.{name}"].delta(), rtol=1e-6, atol=0)
    # peft itself loads it into the unet with the same ΔW as diffusers' fuse
    unet = _unet()
    w0 = {k: v.clone() for k, v in unet.state_dict().items()}
    merged = peft.PeftModel.from_pretrained(unet, str(tmp_path / "unet-lora")).merge_and_unload()
    want = _diffusers_deltas(path)
    for key, w in merged.state_dict().items():
        if key.endswith(".weight") and not torch.equal(w, w0[key]):
            ref = want[f"unet.{key[: -len('.weight')]}"]
            assert torch.linalg.norm((w - w0[key]).double() - ref) <= 1e-6 * torch.linalg.norm(ref)


def test_a_model_needs_a_component(tmp_path: Path) -> None:
    from loratools.convert import convert_file

    path = _save(tmp_path / "src", metadata=False)
    with pytest.raises(InvalidOptionError, match="text_encoder, unet.*`component`"):
        convert_file(path, tmp_path / "out", to="peft")
    with pytest.raises(InvalidOptionError, match="'vae' is not in .*it holds text_encoder, unet"):
        convert_file(path, tmp_path / "out", to="peft", component="vae")
    with pytest.raises(InvalidOptionError, match="--component text_encoder"):  # as merge reads it, with its base
        read_adapter(path, base=BaseModel(tmp_path))
    with pytest.raises(InvalidOptionError, match="holds one"):
        read_with_base(_peft_dir(tmp_path, path), component="unet")
    assert not (tmp_path / "out").exists()


def _peft_dir(tmp_path: Path, path: Path) -> Path:
    from loratools.convert import convert_file

    convert_file(path, tmp_path / "te-lora", to="peft", component="text_encoder")
    return tmp_path / "te-lora"


def test_older_keys_are_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "old.safetensors"
    save_file({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight":
               torch.zeros(2, 4),
               "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.up.weight":
               torch.zeros(4, 2)}, str(path))
    assert detect_format(path) == "diffusers"
    with pytest.raises(NotAnAdapterError, match="older non-peft LoRA keys"):
        read_adapter(path)


def test_metadata_field_loratools_does_not_compute_is_refused(tmp_path: Path) -> None:
    path = _save(tmp_path, metadata=True)
    tensors = load_file(str(path))
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    flat = json.loads(meta["lora_adapter_metadata"])
    flat["unet.use_dora"] = True
    meta["lora_adapter_metadata"] = json.dumps(flat)
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(NotAnAdapterError, match="unet is DoRA"):
        read_adapter(path)


def test_cli_inspect_convert_component_then_merge_into_the_unet(tmp_path: Path) -> None:
    """The guide's path: inspect the pipeline file, take the unet's adapter out, merge it into the unet's own
    ``diffusion_pytorch_model.safetensors``; the merged weights are diffusers' fused ones."""
    from conftest import run_cli

    path = _save(tmp_path / "src", metadata=True)
    unet = _unet()
    unet.save_pretrained(str(tmp_path / "pipeline" / "unet"))
    weights = tmp_path / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"
    shown = run_cli("inspect", path)
    assert shown.returncode == 0, shown.stderr
    assert "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q" in shown.stdout
    refused = run_cli("convert", path, "-o", tmp_path / "all", "--to", "peft")
    assert refused.returncode == 2 and "--component" in refused.stderr and "text_encoder, unet" in refused.stderr
    done = run_cli("convert", path, "-o", tmp_path / "unet-lora", "--to", "peft", "--component", "unet")
    assert done.returncode == 0, done.stderr
    merged = run_cli("merge", weights, tmp_path / "unet-lora", "-o", tmp_path / "merged.safetensors")
    assert merged.returncode == 0, merged.stderr
    w0, w1 = load_file(str(weights)), load_file(str(tmp_path / "merged.safetensors"))
    want = {k[len("unet."):]: v for k, v in _diffusers_deltas(path).items() if k.startswith("unet.")}
    changed = {k[: -len(".weight")] for k in w0 if not torch.equal(w0[k], w1[k])}
    assert changed == set(want)
    for name, ref in want.items():
        d = (w1[f"{name}.weight"] - w0[f"{name}.weight"]).double()
        assert torch.linalg.norm(d - ref) <= 1e-6 * torch.linalg.norm(ref), name


def test_component_left_out_of_the_metadata_is_refused(tmp_path: Path) -> None:
    """diffusers builds ``LoraConfig(**{})`` for it, which peft cannot load: refused there, and here."""
    from loratools.errors import CorruptFileError

    unet, te = _unet(), _text_encoder()
    unet.add_adapter(LoraConfig(**UNET_CFG))  # type: ignore[arg-type]
    te.add_adapter(LoraConfig(**TE_CFG))  # type: ignore[arg-type]
    Mixin.save_lora_weights(str(tmp_path), unet_lora_layers=get_peft_model_state_dict(unet),
                            text_encoder_lora_layers=get_peft_model_state_dict(te),
                            unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())
    path = tmp_path / "pytorch_lora_weights.safetensors"
    with pytest.raises(CorruptFileError, match="no LoraConfig for text_encoder"):
        read_adapter(path)
    sd, alphas, meta = Mixin.lora_state_dict(str(path), return_lora_metadata=True)
    with pytest.raises(ValueError, match="target_modules"):
        Mixin.load_lora_into_text_encoder(sd, alphas, _text_encoder(), metadata=meta)
