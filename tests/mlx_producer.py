"""Run under the mlx venv (``.venv-mlx``: mlx 0.32.4, mlx-lm 0.32.2), never by pytest itself.

``produce DIR KIND [JSON]``: a seeded tiny mlx-lm llama; LoRA or DoRA (KIND) put in as mlx-lm's trainer does
(``model.freeze()``, ``linear_to_lora_layers``), random factors, saved as mlx-lm saves an adapter
(``adapters.safetensors`` of the trainable parameters, ``adapter_config.json`` by ``save_config``); the
base's weights go to ``DIR/base.safetensors`` and mlx-lm's fused weights (``fuse``) to ``DIR/fused.safetensors``.
JSON (an object) replaces fields of the trainer's config (``num_layers``) and of its ``lora_parameters``.

``load DIR ADAPTER``: the base of ``DIR`` with mlx-lm's ``load_adapters(ADAPTER)``, fused, to
``DIR/loaded.safetensors``.
"""

import json
import sys
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models import llama
from mlx_lm.tuner.utils import linear_to_lora_layers, load_adapters
from mlx_lm.utils import save_config

ARGS = dict(model_type="llama", hidden_size=16, num_hidden_layers=3, intermediate_size=24, num_attention_heads=2,
            rms_norm_eps=1e-5, vocab_size=40, num_key_value_heads=1, tie_word_embeddings=False)


def _fuse(model: llama.Model) -> dict:
    fused = [(n, m.fuse()) for n, m in model.named_modules() if hasattr(m, "fuse")]
    model.update_modules(tree_unflatten(fused))
    return dict(tree_flatten(model.parameters()))


def _base(d: Path) -> llama.Model:
    model = llama.Model(llama.ModelArgs(**ARGS))
    model.load_weights(str(d / "base.safetensors"))
    return model


def produce(d: Path, kind: str, changes: dict) -> None:
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs(**ARGS))
    mx.eval(model.parameters())
    mx.save_safetensors(str(d / "base.safetensors"), dict(tree_flatten(model.parameters())))
    model.freeze()
    config = {"model": "tiny-llama", "fine_tune_type": kind, "num_layers": 2, "iters": 1,
              "lora_parameters": {"rank": 4, "scale": 10.0, "dropout": 0.0,
                                  "keys": ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]}}
    config["lora_parameters"].update(changes.pop("lora_parameters", {}))
    config.update(changes)
    linear_to_lora_layers(model, config["num_layers"], config["lora_parameters"], use_dora=kind == "dora")
    # training would move lora_b (and m) away from their start: random values stand in for it
    updates = []
    for name, p in tree_flatten(model.trainable_parameters()):
        noise = 0.05 * mx.random.normal(p.shape)
        updates.append((name, p + noise if name.endswith(".m") else noise if name.endswith("lora_b") else p))
    model.update(tree_unflatten(updates))
    mx.save_safetensors(str(d / "adapter" / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())),
                        metadata={"format": "mlx"})
    save_config(config, d / "adapter" / "adapter_config.json")
    mx.save_safetensors(str(d / "fused.safetensors"), _fuse(model))


def load(d: Path, adapter: Path) -> None:
    model = _base(d)
    model.freeze()
    load_adapters(model, str(adapter))
    mx.save_safetensors(str(d / "loaded.safetensors"), _fuse(model))


if __name__ == "__main__":
    if sys.argv[1] == "produce":
        (Path(sys.argv[2]) / "adapter").mkdir(parents=True, exist_ok=True)
        produce(Path(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4]) if len(sys.argv) > 4 else {})
    else:
        load(Path(sys.argv[2]), Path(sys.argv[3]))
