"""How the base stores what a merge adapts: tied input/output embeddings, and ``Conv1D`` vs ``nn.Linear``.

Neither is in the adapter file; both are read off the base (its config and its tensors' names and
shapes) before :func:`loratools.merge.plan.plan_merge` places the adapter's updates.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from ..adapter import Adapter
from ..errors import InvalidOptionError

__all__ = ["Tie", "HEAD_KEY", "find_tie", "follow_peft_layout"]


@dataclass(frozen=True)
class Tie:
    """A base whose output head *is* its input embedding: ``head`` is absent from its files."""

    head: str
    embed: str


#: the output head of a causal LM in transformers 5.23 (``_tied_weights_keys = {"lm_head.weight": …}``)
HEAD_KEY = "lm_head.weight"
_EMBED_KEYS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "tok_embeddings.weight",
               "embed_in.weight")


def find_tie(hparams: Mapping[str, Any] | None, keys: Collection[str]) -> Tie | None:
    """The base's tied input/output embeddings: its config says ``tie_word_embeddings: true`` (or says
    nothing and it is a causal LM), its files hold no ``lm_head.weight``, and they hold one input embedding."""
    cfg = hparams or {}
    archs = cfg.get("architectures")
    archs = archs if isinstance(archs, list) else []  # a damaged list says nothing of the head
    tied = cfg.get("tie_word_embeddings", any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in archs))
    if tied is not True or HEAD_KEY in keys:
        return None
    embeds = [k for k in keys if k.endswith(_EMBED_KEYS)]
    return Tie(HEAD_KEY, embeds[0]) if len(embeds) == 1 else None


def follow_peft_layout(ad: Adapter, shapes: Mapping[str, tuple[str, tuple[int, ...]]]) -> Adapter:
    """``fan_in_fan_out`` as peft applies it: honoured for GPT-2's ``Conv1D`` (weight stored (in, out)),
    ignored for ``nn.Linear`` (weight (out, in)).

    peft 0.21.2 ``tuners/lora/layer.py`` ``dispatch_default``: for a ``torch.nn.Linear`` target it warns
    and sets ``fan_in_fan_out = False``; for ``Conv1D`` it sets it True. The adapter file does not say
    which class a module was, the base's shapes do: a non-square weight stored (out, in) is an
    ``nn.Linear``, one stored (in, out) a ``Conv1D``. A model's adapted layers are all one or the
    other, so a square weight follows the adapter's non-square ones; when every one is square, GPT-2's
    ``c_*`` names mean ``Conv1D`` and anything else is refused rather than guessed.
    """
    fifo = {n: m for n, m in ad.items() if m.fan_in_fan_out and m.kind == "linear"}
    if not fifo:
        return ad
    votes = set()
    for n, m in fifo.items():
        shape = tuple(shapes.get(f"{n}.weight", ("", ()))[1])
        out_f, in_f = int(m.B.shape[0]), int(m.A.shape[1])
        if out_f != in_f and shape in ((in_f, out_f), (out_f, in_f)):
            votes.add("conv1d" if shape == (in_f, out_f) else "linear")
    if not votes:
        leaves = {n.rsplit(".", 1)[-1] for n in fifo}
        if all(leaf.startswith("c_") for leaf in leaves):
            votes.add("conv1d")
        else:
            raise InvalidOptionError(f"the adapter sets fan_in_fan_out and every weight it adapts is square "
                                     f"(first: {next(iter(fifo))}); peft honours the flag for GPT-2's Conv1D and "
                                     "ignores it for nn.Linear, and the shapes cannot tell which this base uses")
    if votes == {"conv1d"}:
        return ad
    if votes == {"linear"}:
        warnings.warn("fan_in_fan_out is set but the base's adapted weights are nn.Linear (out, in): ignored, "
                      "as peft 0.21.2 does", stacklevel=2)
        return ad.with_modules({n: (m.with_factors(fan_in_fan_out=False) if n in fifo else m)
                                for n, m in ad.items()})
    raise InvalidOptionError("the adapter sets fan_in_fan_out, and the base stores some adapted weights as "
                             "(in, out) and others as (out, in); check that BASE is the adapter's model")
