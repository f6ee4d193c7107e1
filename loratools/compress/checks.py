"""The last check of every compress job before it writes: an adapter a file should hold.

Two results are refused rather than written. An adapter with no module changes nothing, and several
formats cannot even state one (PEFT's ``r`` is the most common rank among none); the job says why it
is empty instead (the models are identical, every weight is zero, the rule kept rank 0 everywhere).
A factor, alpha or scale that is NaN or ±inf (a huge ``weights``/``alpha``, or a difference beyond
the dtype's range) would be written and then refused by every reader, loratools' own included.
"""

from __future__ import annotations

import math

from ..adapter import Adapter
from ..errors import InvalidOptionError
from ..linalg import all_finite

__all__ = ["check_result"]


def check_result(adapter: Adapter, *, empty: str, cause: str) -> None:
    """Refuse ``adapter`` unless it holds a module and every number in it is finite.

    ``empty``: why this job's result has no module; ``cause``: what to change when a value is not finite
    (both end up in the one line the user reads, after "nothing was written").
    """
    if not adapter.modules:
        raise InvalidOptionError(f"nothing to write: {empty}; an adapter without modules changes nothing")
    for name, m in adapter.modules.items():
        tensors = [m.A, m.B] + [t for t in (m.E, m.bias, m.magnitude) if t is not None]
        if not (math.isfinite(m.alpha) and math.isfinite(m.scale) and all(all_finite(t) for t in tensors)):
            raise InvalidOptionError(f"the result's {name} would hold NaN or ±inf (alpha {m.alpha:g}, "
                                     f"scale {m.scale:g}); nothing was written: {cause}")
