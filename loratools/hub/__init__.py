"""The Hugging Face Hub: :func:`~loratools.hub.client.pull` and :func:`~loratools.hub.client.push` (in
:mod:`.client`, the only module that talks to the network) and the model card (:mod:`.card`, pure text)."""
