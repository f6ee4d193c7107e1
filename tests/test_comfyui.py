"""ComfyUI LoraSave files, merged as ComfyUI merges them.

ComfyUI does not install as a package, so both sides come from its source: the file is built by LoraSave's
recipe (``comfy_extras/nodes_lora_extract.py`` ``calc_lora_model``/``extract_lora`` at commit 962638c9: per
``diffusion_model.`` weight, a rank-r truncated SVD clamped at its 0.99 quantile as ``lora_up``/``lora_down``
in float16, or the whole difference as ``.diff``; 1-D weights as ``.diff`` and biases as ``.diff_b`` with
``bias_diff``), and the reference merge is ComfyUI's arithmetic on that file in float64 (``comfy/lora.py``
``load_lora``, ``comfy/weight_adapter/lora.py`` ``LoRAAdapter.calculate_weight``: W + (alpha/r or 1)·up·down,
W + diff, bias + diff_b). The base is a ComfyUI single-file checkpoint (``model.diffusion_model.*``) of the
tiny SGM-named U-Net of ``test_kohya_sdxl``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file, save_file

from loratools.errors import NotAnAdapterError
from loratools.formats import detect_format, read_adapter

pytest.importorskip("diffusers")
from test_kohya_sdxl import _sgm, _unet  # noqa: E402

PREFIX = "diffusion_model."
CKPT = "model.diffusion_model."


def _extract_lora(diff: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """LoraSave's ``extract_lora``: truncated SVD, the factors clamped at their 0.99 quantile."""
    conv = diff.ndim == 4
    out_dim, in_dim = diff.shape[:2]
    rank = min(rank, in_dim, out_dim)
    flat = (diff.flatten(1) if diff.shape[2:] != (1, 1) else diff.squeeze()) if conv else diff
    U, S, Vh = torch.linalg.svd(flat.float())
    U, Vh = U[:, :rank] @ torch.diag(S[:rank]), Vh[:rank, :]
    hi = torch.quantile(torch.cat([U.flatten(), Vh.flatten()]), 0.99)
    U, Vh = U.clamp(-hi, hi), Vh.clamp(-hi, hi)
    if conv:
        U, Vh = U.reshape(out_dim, rank, 1, 1), Vh.reshape(rank, in_dim, *diff.shape[2:])
    return U, Vh


def _models() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(base, tuned) SGM state dicts: every matrix and convolution changed, and the biases of the attention
    outputs; norms untouched (a LoRA-merged fine-tune, the usual input of LoraSave)."""
    base = {_sgm(k.rsplit(".", 1)[0]) + "." + k.rsplit(".", 1)[1]: v for k, v in _unet().state_dict().items()}
    g = torch.Generator().manual_seed(5)
    tuned = {}
    for k, v in base.items():
        change = v.ndim >= 2 or (k.endswith("to_out.0.bias"))
        tuned[k] = v + 0.01 * torch.randn(v.shape, generator=g) if change else v.clone()
    return base, tuned


def _lora_save(path: Path, *, full: bool, bias_diff: bool, rank: int = 2) -> Path:
    """``calc_lora_model(model_diff, rank, "diffusion_model.", "diffusion_model.", …)`` on tuned − base."""
    base, tuned = _models()
    out: dict[str, torch.Tensor] = {}
    for k in base:
        d = tuned[k] - base[k]
        if k.endswith(".weight"):
            if full:
                out[f"{PREFIX}{k[:-7]}.diff"] = d.contiguous().half()
            elif d.ndim < 2:
                if bias_diff:
                    out[f"{PREFIX}{k[:-7]}.diff"] = d.contiguous().half()
            else:
                up, down = _extract_lora(d, rank)
                out[f"{PREFIX}{k[:-7]}.lora_up.weight"] = up.contiguous().half()
                out[f"{PREFIX}{k[:-7]}.lora_down.weight"] = down.contiguous().half()
        elif bias_diff and k.endswith(".bias"):
            out[f"{PREFIX}{k[:-5]}.diff_b"] = d.contiguous().half()
    save_file(out, str(path))
    return path


def _comfy_merge(base: dict[str, torch.Tensor], lora: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI's merge of a LoraSave file into a checkpoint, float64 (strength 1)."""
    merged = {k: v.double().clone() for k, v in base.items()}
    for key, t in lora.items():
        module = key[len(PREFIX):].rsplit(".", 2 if key.endswith(".weight") else 1)[0]
        w = f"{CKPT}{module}.weight"
        if key.endswith(".lora_up.weight"):
            down = lora[key.replace("lora_up", "lora_down")].double()
            alpha = lora.get(f"{PREFIX}{module}.alpha")
            s = 1.0 if alpha is None else float(alpha) / down.shape[0]
            merged[w] += s * (t.double().flatten(1) @ down.flatten(1)).reshape(merged[w].shape)
        elif key.endswith(".diff") and t.shape == merged[w].shape:
            merged[w] += t.double()
        elif key.endswith(".diff_b"):
            merged[f"{CKPT}{module}.bias"] += t.double()
    return merged


def _checkpoint(path: Path) -> Path:
    base, _ = _models()
    save_file({CKPT + k: v for k, v in base.items()}, str(path))
    return path


@pytest.mark.parametrize("full,bias_diff", [(False, False), (False, True), (True, True)],
                         ids=["standard", "standard-bias_diff", "full_diff-bias_diff"])
def test_lora_save_file_merges_as_comfyui_merges(tmp_path: Path, full: bool, bias_diff: bool) -> None:
    lora = _lora_save(tmp_path / "lora.safetensors", full=full, bias_diff=bias_diff)
    assert detect_format(lora) == "comfyui"
    ckpt = _checkpoint(tmp_path / "ckpt.safetensors")
    done = run_cli("merge", ckpt, lora, "-o", tmp_path / "merged.safetensors", "--precision", "float64")
    assert done.returncode == 0, done.stderr
    base, got = load_file(str(ckpt)), load_file(str(tmp_path / "merged.safetensors"))
    want = _comfy_merge(base, load_file(str(lora)))
    changed = {k for k in base if not torch.equal(got[k], base[k])}
    assert changed == {k for k in base if not torch.equal(want[k].float(), base[k])}
    assert any(k.endswith(".bias") for k in changed) == bias_diff
    for k in changed:  # one float32 rounding of the exact sum
        assert torch.allclose(got[k].double(), want[k], rtol=2**-23, atol=1e-12), k


def test_full_difference_is_an_exact_lora(tmp_path: Path) -> None:
    """A .diff of a matrix or convolution is held as I·D or D·I: its ΔW is the difference itself, bit for bit."""
    lora = _lora_save(tmp_path / "lora.safetensors", full=True, bias_diff=False)
    t = load_file(str(lora))
    adapter = read_adapter(lora)
    assert {m.kind for m in adapter.modules.values()} == {"linear", "conv"}
    file_name = {f"unet.{n}": f"{PREFIX}{_sgm(n)}" for n, m in _unet().named_modules() if hasattr(m, "weight")}
    for name, m in adapter.items():
        assert torch.equal(m.delta(dtype=torch.float64), t[f"{file_name[name]}.diff"].double()), name
        assert m.rank == min(m.weight_shape[0], int(torch.tensor(m.weight_shape[1:]).prod()))


def test_a_changed_norm_weight_is_refused_by_name(tmp_path: Path) -> None:
    lora = _lora_save(tmp_path / "lora.safetensors", full=False, bias_diff=True)
    t = load_file(str(lora))
    key = next(k for k, v in t.items() if k.endswith(".diff") and v.ndim == 1)
    t[key] = torch.ones_like(t[key])
    save_file(t, str(lora))
    with pytest.raises(NotAnAdapterError, match="norm layer") as e:
        read_adapter(lora)
    assert key in str(e.value)


@pytest.mark.parametrize("extra,why", [("lora_mid.weight", "lora_mid"), ("dora_scale", "DoRA"), ("diff", "both a LoRA")])
def test_what_comfyui_reads_but_loratools_does_not_is_refused_by_name(tmp_path: Path, extra: str, why: str) -> None:
    lora = _lora_save(tmp_path / "lora.safetensors", full=False, bias_diff=False)
    t = load_file(str(lora))
    up = next(k for k in t if k.endswith(".lora_up.weight"))
    module = up[: -len(".lora_up.weight")]
    t[f"{module}.{extra}"] = torch.ones(2, 2) if extra != "diff" else torch.ones_like(t[up])
    save_file(t, str(lora))
    with pytest.raises(Exception, match=why) as e:
        read_adapter(lora)
    assert module in str(e.value)
