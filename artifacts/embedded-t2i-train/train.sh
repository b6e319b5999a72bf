#!/usr/bin/env bash
# Training of the embedded text-to-image model (BSQ-VAE + tiny T5 + Infinity). Every phase resumes from its
# run directory: kill it at any time (SIGTERM/Ctrl-C checkpoints at the next step; SIGKILL loses at most
# --ckpt-every steps) and run the same command again. Works from any directory after `pip install -e .`.
#
#   bash artifacts/embedded-t2i-train/train.sh bsq       # 1. BSQ-VAE tokenizer
#   bash artifacts/embedded-t2i-train/train.sh freeze    # 2. freeze its latest (EMA) weights for the transformer
#   bash artifacts/embedded-t2i-train/train.sh infinity  # 3. Infinity + T5 (jointly) on the frozen tokenizer
#   bash artifacts/embedded-t2i-train/train.sh export    # 4. write src/fastvar/assets/embedded_t2i*
#   bash artifacts/embedded-t2i-train/train.sh gates     # 5. procedural GenEval gates -> benchmarks/embedded_t2i_gates.json
#
# THREADS (default 1) sets torch's CPU threads. On a GPU node prefix phase 3 with
# `torchrun --standalone --nproc_per_node N` instead of `python` (bf16 autocast, DDP; --zero 2|3 for FSDP).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
A=artifacts/embedded-t2i-train
THREADS=${THREADS:-1}
export OMP_NUM_THREADS=$THREADS
case "${1:-}" in
  bsq)
    exec python -m fastvar.train.cli bsq --out $A/bsq --data procedural-t2i --threads "$THREADS" \
      --image-size 128 --codebook-dim 16 --patch-size 8 --base-ch 32 --ch-mult 1,1,2,2 --num-res-blocks 1 \
      --schedule 1,2,3,4,6,8,11,16 --batch-size 8 --steps 1200 --lr 6e-4 --warmup 100 --ema 0.995 \
      --ckpt-every 50 --log-every 10 --keep-last 1 ;;
  freeze)
    python -c "from fastvar.train.bsq_train import export_bsq; print(export_bsq('$A/bsq', '$A/bsq-frozen.safetensors'))" ;;
  recon)  # held-out reconstruction PSNR + procedural-detector agreement of the frozen tokenizer (JSON)
    python -c "import json; from fastvar.train.bsq_train import load_bsq, recon_report; v, i, _ = load_bsq('$A/bsq-frozen.safetensors'); \
print(json.dumps(recon_report(v, tuple(tuple(s) for s in i['schedule']), n=${SAMPLES:-64})))" ;;
  infinity)
    exec python -m fastvar.train.cli infinity --out $A/infinity --bsq $A/bsq-frozen.safetensors --data procedural-t2i \
      --threads "$THREADS" --depth 6 --embed-dim 256 --num-heads 4 --t5-d-model 128 --t5-layers 2 --t5-heads 4 \
      --t5-d-ff 256 --text-maxlen 32 --text-mode joint --bsc-rate 0.3 --bsc-mode uniform --cond-drop-rate 0.1 \
      --batch-size 8 --steps ${INF_STEPS:-20000} --lr 5e-4 --warmup ${INF_WARMUP:-50} --ema 0.999 --ckpt-every 25 --log-every 5 --keep-last 1 ;;
  compact)  # before committing: latest Infinity checkpoint's weights + EMA in bf16, AdamW moments left out (~30 MB, not ~90)
    python -c "from fastvar.train.infinity_train import compact_checkpoint; print(compact_checkpoint('$A/infinity', drop_optimizer=True))" ;;
  export)
    python -c "from fastvar.train.infinity_train import export_t2i; print(export_t2i('$A/infinity', '$A/bsq-frozen.safetensors', 'src/fastvar/assets'))" ;;
  gates)  # GenEval (procedural detector) on the shipped prompt file, 4 samples per prompt, held-out seed;
          # PRESET=fastvar adds the accelerated run (same seeds) and writes benchmarks/embedded_t2i_gates_<preset>.json
    G=${GATES_DIR:-/tmp/embedded-t2i-gates}
    P=${PRESET:-}
    fastvar eval generate --model embedded-t2i --device cpu --prompts-file src/fastvar/assets/geneval_procedural_t2i.jsonl \
      --samples-per-prompt 4 --seed ${SEED:-20261202} --out $G${P:+-$P} ${P:+--preset $P} --quiet
    fastvar eval geneval --images $G${P:+-$P} --detector procedural --device cpu \
      --json benchmarks/embedded_t2i_gates${P:+_$P}.json ;;
  *)
    echo "usage: $0 bsq|freeze|recon|infinity|compact|export|gates" >&2; exit 2 ;;
esac
