"""A local causal language model and its data: loading it (:mod:`.load`, safetensors only), the rows of
training and calibration data (:mod:`.data`), and the held-out loss (:mod:`.heldout`).

Training (:mod:`loratools.train`), pruning with calibration data (:mod:`loratools.compress.prune`) and the
held-out reports all stand on this package; none of them imports another.
"""
