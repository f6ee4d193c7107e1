"""Jobs that make an adapter smaller or make one from others.

- :mod:`.extract`: a full fine-tune (or any two models) → a LoRA adapter, by truncated SVD of ``W − W0``;
- :mod:`.resize`: an adapter → a lower rank, exactly the best approximation of its ΔW at that rank;
- :mod:`.prune`: an AdaLoRA (or LoRA) adapter → fewer triplets, by importance (calibration data or magnitude);
- :mod:`.combine`: several adapters → one (sum, TIES, DARE);
- :mod:`.ranks`: choosing ranks across modules under a budget (pure maths, used by the jobs above).

Each job has a value-level call over :class:`~loratools.adapter.Adapter` objects (``resize_adapter``…) and a
path-level one that reads, checks and writes (``resize_file``…); the CLI calls the path-level one.
"""
