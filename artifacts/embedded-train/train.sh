#!/usr/bin/env bash
# Training of the embedded (shipped) VQVAE + VAR pair. Every phase is resumable: kill it at any time
# (SIGTERM/Ctrl-C writes a checkpoint at the next step; SIGKILL loses at most --ckpt-every steps) and
# run the same command again to continue. Works from any directory; needs only `pip install -e .`.
#
#   bash artifacts/embedded-train/train.sh vqvae    # 1. tokenizer (until --steps)
#   bash artifacts/embedded-train/train.sh freeze   # 2. freeze its latest weights for the VAR
#   bash artifacts/embedded-train/train.sh var      # 3. transformer on the frozen tokenizer
#   bash artifacts/embedded-train/train.sh export   # 4. write src/fastvar/assets/embedded_* (+ json)
#   bash artifacts/embedded-train/train.sh check    # 5. quality gates (accuracy, recon PSNR) as JSON
#
# THREADS (default 1) sets torch's CPU threads; the machine this was started on was shared.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
A=artifacts/embedded-train
THREADS=${THREADS:-1}
export OMP_NUM_THREADS=$THREADS
case "${1:-}" in
  vqvae)
    exec nice -n 10 python -m fastvar.train.cli vqvae --out $A/vqvae --threads "$THREADS" \
      --batch-size 8 --steps 1100 --lr 6e-4 --warmup 100 --ema 0.995 --ckpt-every 50 --log-every 10 --keep-last 1 ;;
  freeze)
    python -c "from fastvar.train.var_train import export_vqvae; print(export_vqvae('$A/vqvae', '$A/vqvae-frozen.safetensors'))" ;;
  var)
    exec nice -n 10 python -m fastvar.train.cli var --out $A/var --vqvae $A/vqvae-frozen.safetensors --threads "$THREADS" \
      --depth 6 --embed-dim 192 --num-heads 3 --batch-size 16 --steps 7800 --lr 5e-4 --warmup 300 --ema 0.999 --pg 0.25 --pg0 6 --pgwp 100 \
      --ckpt-every 50 --log-every 10 --keep-last 1 ;;
  export)
    python -c "from fastvar.train.embedded import export_embedded; print(export_embedded('$A/vqvae-frozen.safetensors', '$A/var'))" ;;
  check)
    python -c "import json; from fastvar.train.check import check_embedded; print(json.dumps(check_embedded(${SAMPLES:-100}, ${SEED:-0}), indent=1))" ;;
  *)
    echo "usage: $0 vqvae|freeze|var|export|check" >&2; exit 2 ;;
esac
