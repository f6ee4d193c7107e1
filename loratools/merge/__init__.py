"""Merge adapters into a base model, take them back out, and check a merge.

Merging adds each adapter's low-rank update to the weight it adapts::

    W = cast(W0 + Σᵢ wᵢ·ΔWᵢ)        un-merging:   W0 ≈ cast(W − Σᵢ wᵢ·ΔWᵢ)

with every ΔWᵢ formed and summed in float32 (or float64) and a single cast to the output dtype at the end.

The package, by step:

- :mod:`.jobs`: :func:`merge_model`, :func:`unmerge_model`, :func:`verify_merge` (safetensors and GGUF bases);
- :mod:`.report`: the one :class:`MergeReport` and the :class:`VerifyReport`;
- :mod:`.plan` (pure: every check before a byte is written), :mod:`.layout`, :mod:`.experts`, :mod:`.config`;
- :mod:`.kernels` (the arithmetic), :mod:`.stream` (a tensor a block of rows at a time);
- :mod:`.patch` and :mod:`.record`: what the final cast lost, so that an un-merge restores the base bit for bit;
- :mod:`.gguf`, :mod:`.gguf_stream`, :mod:`.gguf_record`: the same for a llama.cpp GGUF base.
"""

from __future__ import annotations

from ..io import Progress
from .jobs import Adapters, merge_model, unmerge_model, verify_merge
from .kernels import delta_sum, jitter, low_rank, merged_tensor, tolerance, unmerged_tensor
from .plan import METADATA_KEY, AdapterInput, TensorPlan, plan_merge, saved_base_key
from .report import MergeReport, ModuleCheck, VerifyReport

__all__ = [
    "AdapterInput", "Adapters", "TensorPlan", "MergeReport", "VerifyReport", "ModuleCheck", "Progress",
    "delta_sum", "low_rank", "merged_tensor", "unmerged_tensor", "plan_merge", "saved_base_key", "tolerance",
    "jitter", "merge_model", "unmerge_model", "verify_merge", "METADATA_KEY",
]
