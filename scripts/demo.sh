#!/usr/bin/env bash
# The demo: loratools end to end on the bundled fixtures. Run it with `make demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=demo-out
rm -rf "$OUT" && mkdir -p "$OUT"
step() { printf '\n\033[1m== %s\033[0m\n$ %s\n' "$1" "${*:2}"; "${@:2}"; }

step "Inspect a PEFT LoRA adapter" loratools inspect fixtures/adapters/lora
step "Inspect a pruned PEFT AdaLoRA adapter (one module kept rank 0)" loratools inspect fixtures/adapters/adalora
step "Inspect loratools' single-file form, as JSON (first lines)" bash -c "loratools inspect fixtures/adapters/lora.safetensors --json | head -n 12"
# Hub: push and pull against a loopback stand-in for the Hub (tests/hub_server.py): no internet needed.
# A subshell, so that HF_* settings do not leak into the steps after it.
(
  python tests/hub_server.py --token hf_demo_token_0123456789 --user demo --url-file "$OUT/hub-url" --lifetime 120 &
  HUB_PID=$!
  trap 'kill $HUB_PID 2>/dev/null || true' EXIT
  for _ in $(seq 100); do [ -s "$OUT/hub-url" ] && break; sleep 0.1; done
  export HF_ENDPOINT="$(cat "$OUT/hub-url")" HF_HOME="$OUT/hf-home" HF_TOKEN=hf_demo_token_0123456789 HF_HUB_DISABLE_XET=1
  step "Push an AdaLoRA adapter (PEFT layout + model card, one commit)" loratools push fixtures/adapters/adalora demo/tiny-adalora --private
  step "Push the single-file LoRA to a branch (converted to PEFT layout first)" loratools push fixtures/adapters/lora.safetensors demo/tiny-lora --revision dev
  step "Pull it back into a folder" loratools -q pull demo/tiny-lora --revision dev -o "$OUT/pulled-lora"
  step "The model card it carries (metadata)" head -n 8 "$OUT/pulled-lora/README.md"
  step "Any ADAPTER argument may be hf://REPO_ID[@REV]" loratools inspect hf://demo/tiny-adalora
  step "Offline mode serves the cache" env HF_HUB_OFFLINE=1 loratools -q pull demo/tiny-adalora
)

# --- compress: extract a LoRA from a full fine-tune, resize it, prune an AdaLoRA ---------------------------------
step "Make a 'fully fine-tuned' copy of the fixture: every block projection + a rank-6 delta + 5% noise" \
  python -c "
import shutil, torch
from safetensors.torch import load_file, save_file
shutil.copytree('fixtures/tiny-llama', '$OUT/tuned')
w = load_file('fixtures/tiny-llama/model.safetensors'); g = torch.Generator().manual_seed(0)
for k, t in w.items():
    if t.ndim == 2 and '.layers.' in k:
        d = torch.randn(t.shape[0], 6, generator=g) @ torch.randn(6, t.shape[1], generator=g) * 0.01
        w[k] = t + d + 0.05 * d.norm() / t.numel() ** 0.5 * torch.randn(t.shape, generator=g)
save_file(w, '$OUT/tuned/model.safetensors', metadata={'format': 'pt'})
print('wrote $OUT/tuned')"
step "Extract a LoRA: per layer the smallest rank with ≤ 10% relative error (measured)" \
  loratools extract fixtures/tiny-llama "$OUT/tuned" -o "$OUT/extracted" --error 0.1 --max-rank 16
step "Resize it to rank 3 (from the factors; exact errors)" loratools resize "$OUT/extracted" -o "$OUT/rank3" --rank 3
step "… and what rank 2 costs on the task: held-out loss before and after (base + adapter)" \
  loratools resize fixtures/adapters/lora -o "$OUT/lora-rank2" --rank 2 --base fixtures/tiny-llama --data fixtures/corpus.txt
step "AdaLoRA → plain LoRA with the same ΔW (what serving engines load)" \
  loratools resize fixtures/adapters/adalora -o "$OUT/adalora-as-lora" --energy 1.0
step "Prune the AdaLoRA to 8 triplets by magnitude" loratools prune fixtures/adapters/adalora -o "$OUT/pruned" --budget 8
step "… or keep half of its triplets" loratools prune fixtures/adapters/adalora -o "$OUT/pruned-half" --keep 0.5
step "Convert the rsLoRA adapter (rank/alpha patterns) to kohya's format, ΔW checked" loratools convert fixtures/adapters/rslora -o "$OUT/rslora-kohya.safetensors" --to kohya
step "Inspect the kohya file" loratools inspect "$OUT/rslora-kohya.safetensors"
if python -c "import gguf" 2>/dev/null; then
  step "Convert the pruned AdaLoRA adapter to a llama.cpp GGUF adapter" loratools convert fixtures/adapters/adalora -o "$OUT/adalora.gguf" --to gguf --base fixtures/tiny-llama
  step "Inspect the GGUF adapter" loratools inspect "$OUT/adalora.gguf"
  step "And back to PEFT" loratools convert "$OUT/adalora.gguf" -o "$OUT/adalora-from-gguf" --to peft --base fixtures/tiny-llama
  step "Export the AdaLoRA adapter for llama.cpp (LoRA, scales folded for alpha/rank), checked on read-back" \
    loratools export fixtures/adapters/adalora --for llama.cpp -o "$OUT/served-llama-cpp.gguf" --base fixtures/tiny-llama
  step "… and for Ollama: adapter.gguf and a Modelfile" \
    bash -c "loratools -q export fixtures/adapters/lora --for ollama -o $OUT/served-ollama --base fixtures/tiny-llama && cat $OUT/served-ollama/Modelfile"
else
  printf '\n(GGUF steps skipped: the gguf package is absent; pip install "loratools[gguf]")\n'
fi
# --- image-model LoRAs: one file per pipeline (U-Net + text encoder), in kohya's, diffusers' and ComfyUI's names -----
step "Make a small kohya SD 1.5-style LoRA file (two U-Net attention projections, two CLIP layers)" \
  python -c "
import torch
from safetensors.torch import save_file
g = torch.Generator().manual_seed(0); t = {}
for k, (o, i) in {'lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q': (32, 32),
                  'lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn2_to_k': (32, 48),
                  'lora_te_text_model_encoder_layers_0_self_attn_q_proj': (48, 48),
                  'lora_te_text_model_encoder_layers_0_mlp_fc1': (96, 48)}.items():
    t[k + '.lora_down.weight'] = torch.randn(4, i, generator=g) * 0.1
    t[k + '.lora_up.weight'] = torch.randn(o, 4, generator=g) * 0.1
    t[k + '.alpha'] = torch.tensor(2.0)
save_file(t, '$OUT/sd-lora.safetensors', metadata={'ss_network_module': 'networks.lora'})
print('wrote $OUT/sd-lora.safetensors')"
step "Inspect it: kohya-sd, modules named as diffusers names them (unet., text_encoder.)" \
  bash -c "loratools inspect $OUT/sd-lora.safetensors | head -n 9"
step "Convert it to diffusers' pipeline LoRA (pytorch_lora_weights.safetensors), ΔW checked" \
  loratools convert "$OUT/sd-lora.safetensors" -o "$OUT/pytorch_lora_weights.safetensors" --to diffusers
step "… and to ComfyUI's names (diffusion_model.<SGM name>, text_encoders.clip_l.…)" \
  loratools convert "$OUT/pytorch_lora_weights.safetensors" -o "$OUT/comfy-lora.safetensors" --to comfyui
step "… and the U-Net's part alone as a peft adapter" \
  loratools convert "$OUT/comfy-lora.safetensors" -o "$OUT/unet-lora" --to peft --component unet
# --- serving: what each runtime will do with an adapter, and a rewrite it loads with the same ΔW ----------------
step "Check the rsLoRA adapter (rank/alpha patterns) for vLLM: exit 1, vLLM ≤ 0.31 gives every module one scale" \
  bash -c "loratools check fixtures/adapters/rslora --for vllm; echo \"exit code \$?\""
step "Export it for vLLM with --max-lora-rank 8: scales folded, ranks chosen together, read back and measured" \
  loratools export fixtures/adapters/rslora --for vllm -o "$OUT/served-vllm" --max-lora-rank 8
step "The export passes the check" loratools check "$OUT/served-vllm" --for vllm --max-lora-rank 8
step "Export for SGLang under a budget of 20,000 parameters (one rank for all, q/k/v stackable)" \
  loratools export fixtures/adapters/rslora --for sglang -o "$OUT/served-sglang" --budget 20000
step "Train a LoRA adapter on the fixture model for a few seconds (held-out loss from step 0, the base's)" loratools train fixtures/tiny-llama fixtures/corpus.txt -o "$OUT/trained-lora" --steps 20 --rank 4 --lr 2e-3 --seq-len 32 --eval-split 0.02 --eval-every 5
step "Inspect the trained adapter" loratools inspect "$OUT/trained-lora"
step "Train AdaLoRA (12 → 4 triplets per layer on average), saved with its final rank_pattern" loratools train fixtures/tiny-llama fixtures/corpus.txt -o "$OUT/trained-adalora" --method adalora --init-rank 12 --target-rank 4 --alpha 12 --steps 20 --lr 1e-2 --seq-len 32 --eval-split 0.02
step "Inspect the AdaLoRA result (ranks differ per layer)" loratools inspect "$OUT/trained-adalora"
step "Train DoRA (LoRA plus a magnitude per output row; peft's use_dora) for 10 steps" loratools train fixtures/tiny-llama fixtures/corpus.txt -o "$OUT/trained-dora" --dora --steps 10 --rank 4 --lr 2e-3 --seq-len 32 --eval-split 0.02
step "Merge the trained DoRA (a norm pass, then the rescaled merge) and verify it" \
  loratools merge fixtures/tiny-llama "$OUT/trained-dora" -o "$OUT/merged-dora" --verify
step "Merge the LoRA into the base (streaming), with a record for exact un-merge, and verify it" \
  loratools merge fixtures/tiny-llama fixtures/adapters/lora -o "$OUT/merged" --record "$OUT/merged.record.safetensors" --verify
step "Un-merge without the record: the error rounding left behind" \
  loratools unmerge "$OUT/merged" fixtures/adapters/lora -o "$OUT/unmerged"
step "Un-merge with the record: the base comes back bit for bit" \
  loratools unmerge "$OUT/merged" fixtures/adapters/lora -o "$OUT/unmerged-exact" --record "$OUT/merged.record.safetensors"
step "Push preview: the files and model card, nothing uploaded" bash -c "loratools push $OUT/trained-lora me/trained-lora --base-model HuggingFaceTB/SmolLM2-135M --dry-run | head -n 20"
step "Merge into bfloat16 and un-merge: what bfloat16 rounding costs without a record" \
  bash -c "loratools -q merge fixtures/tiny-llama fixtures/adapters/lora -o $OUT/merged-bf16 --dtype bfloat16 && loratools unmerge $OUT/merged-bf16 fixtures/adapters/lora -o $OUT/unmerged-bf16"
step "Check a merged model against base + adapter" loratools verify fixtures/tiny-llama fixtures/adapters/lora "$OUT/merged"
step "Evaluate the same text on base, base + adapter and the merged model: how much of the adapter's effect each keeps" \
  loratools eval fixtures/tiny-llama fixtures/adapters/lora --data fixtures/corpus.txt --stack merged:"$OUT/merged" --html "$OUT/eval.html"
step "QLoRA: NF4's rounding of the base next to the adapter's ΔW, per layer (which base to merge onto)" \
  loratools inspect fixtures/adapters/lora --base fixtures/tiny-llama --qlora nf4-dq
step "QLoRA: train on the base held as NF4 codes (double-quantized), dequantized in each forward; the base is recorded" \
  loratools train fixtures/tiny-llama fixtures/corpus.txt -o "$OUT/trained-qlora" --quantize nf4-dq --steps 10 --rank 4 --lr 2e-3 --seq-len 32 --eval-split 0.02
step "… merge it onto exactly the weights it was trained on (the 4-bit type is taken from its record)" \
  loratools merge fixtures/tiny-llama "$OUT/trained-qlora" -o "$OUT/merged-qlora" --onto dequantized
step "Combine two adapters into one (no base): ΔW = ΔW_lora − ½·ΔW_rslora, exact (stacked factors, rank Σrᵢ)" \
  loratools combine fixtures/adapters/lora fixtures/adapters/rslora --weight 1 --weight -0.5 -o "$OUT/combined"
step "… the same sum at rank 4: the best rank-4 approximation per module, from the factors (exact errors)" \
  loratools combine fixtures/adapters/lora fixtures/adapters/rslora --weight 1 --weight -0.5 -o "$OUT/combined-r4" --rank 4
step "The combined adapter merges into the base like any other" \
  loratools merge fixtures/tiny-llama "$OUT/combined" -o "$OUT/merged-combined" --verify
step "The trained adapters feed every other command: merge the trained LoRA into the base and verify it" \
  loratools merge fixtures/tiny-llama "$OUT/trained-lora" -o "$OUT/merged-trained" --verify
step "… prune the trained AdaLoRA to 12 triplets, as plain LoRA" \
  loratools prune "$OUT/trained-adalora" -o "$OUT/trained-adalora-pruned" --budget 12 --to lora
printf '\nDemo finished; outputs are in %s/\n' "$OUT"
