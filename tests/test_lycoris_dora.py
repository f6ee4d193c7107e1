"""LyCORIS DoRA (``dora_scale``) files: refused by name, with the reason measured here against LyCORIS 4.1.3.

An Adapter's DoRA is peft 0.21.2's (``tuners/lora/dora.py``): W′ = V · m / ‖V‖_row, V = W0 + s·BA, no ε. LyCORIS
4.1.3 (``functional/general.py`` ``_weight_decompose``) divides by ‖V‖ + ε (ε = finfo(dora_scale.dtype).eps, 2⁻²³
for the float32 ``dora_scale`` it creates) and, with ``wd_on_out=False``, normalises input columns instead. These
tests pin both facts on LyCORIS's own modules (a change in LyCORIS fails them), and the refusals that follow.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import run_cli

from test_lycoris import _base, _network  # the seeded tiny model with a LyCORIS network on every layer

from loratools.errors import NotAnAdapterError  # noqa: E402
from loratools.formats import read_adapter  # noqa: E402

EPS32 = torch.finfo(torch.float32).eps


def _dora(wd_on_output: bool) -> tuple[torch.nn.Module, object]:
    return _network("locon", {}, dora_wd=True, wd_on_output=wd_on_output)


def _lycoris_merged(lm: object) -> torch.Tensor:
    with torch.no_grad():
        return lm.get_merged_weight(1)[0]  # type: ignore[attr-defined]


def test_lycoris_dora_divides_output_row_norms_plus_float32_eps() -> None:
    """LyCORIS's merged weight is V · m / (‖V‖_row + 2⁻²³); peft's rule (no ε) misses it by more than 1e-6 on a
    row whose norm is small, which is why such a file is not read as peft's DoRA."""
    _, net = _dora(True)
    lm = next(m for m in net.loras if m.lora_name == "lora_te_q_proj")  # type: ignore[attr-defined]
    with torch.no_grad():
        lm.org_module[0].weight[0].mul_(1e-3)  # one row of W0 with a small norm
        lm.lora_up.weight[0].mul_(1e-3)
        w0 = lm.org_module[0].weight.double()
        v = w0 + lm.get_diff_weight(1)[0].double()
        m = lm.dora_scale.double()
    assert lm.dora_scale.dtype == torch.float32 and tuple(lm.dora_scale.shape) == (8, 1)
    got = _lycoris_merged(lm).double()
    norm = v.norm(dim=1, keepdim=True)
    lycoris_rule, peft_rule = v * m / (norm + EPS32), v * m / norm
    assert torch.linalg.norm(got - lycoris_rule) <= 1e-6 * torch.linalg.norm(lycoris_rule)
    gap = (peft_rule[0] - lycoris_rule[0]).norm() / lycoris_rule[0].norm()
    assert gap > 1e-6, float(gap)


def test_lycoris_dora_without_wd_on_out_normalises_input_columns() -> None:
    _, net = _dora(False)
    lm = next(m for m in net.loras if m.lora_name == "lora_te_q_proj")  # type: ignore[attr-defined]
    assert tuple(lm.dora_scale.shape) == (1, 12)
    with torch.no_grad():
        v = lm.org_module[0].weight.double() + lm.get_diff_weight(1)[0].double()
        want = v * lm.dora_scale.double() / (v.norm(dim=0, keepdim=True) + EPS32)
    got = _lycoris_merged(lm).double()
    assert torch.linalg.norm(got - want) <= 1e-6 * torch.linalg.norm(want)


@pytest.mark.parametrize(("wd_on_output", "words"), [
    (True, ("dora_scale of shape (out, 1)", "2⁻²³", "no ε")),
    (False, ("wd_on_out=False", "input column", "loads only the output-row kind")),
])
def test_lycoris_dora_file_is_refused_with_its_kind_and_reason(tmp_path: Path, wd_on_output: bool,
                                                             words: tuple[str, ...]) -> None:
    _, net = _dora(wd_on_output)
    path = tmp_path / "dora.safetensors"
    net.save_weights(str(path), torch.float32, None)  # type: ignore[attr-defined]
    with pytest.raises(NotAnAdapterError) as e:
        read_adapter(path)
    message = str(e.value)
    assert "lora_te_" in message and "\n" not in message and "loratools extract" in message
    for w in words:
        assert w in message, w


def test_merging_a_lycoris_dora_file_exits_2_and_writes_nothing(tmp_path: Path) -> None:
    model, net = _dora(True)
    path = tmp_path / "dora.safetensors"
    net.save_weights(str(path), torch.float32, None)  # type: ignore[attr-defined]
    done = run_cli("merge", _base(tmp_path, model), path, "-o", tmp_path / "out.safetensors")
    assert done.returncode == 2 and "LyCORIS DoRA" in done.stderr
    assert not (tmp_path / "out.safetensors").exists()
