#!/usr/bin/env bash
# Train the default SAEs for SmolLM2-135M-Instruct: generate chat transcripts with
# the model, add them to the text corpus, and train one TopK SAE per hookpoint.
#
#   bash scripts/train_default_sae.sh CORPUS.jsonl OUTDIR [DEVICE]
#
# Knobs (environment): LAYERS ("10 15 20"), TOKENS (training tokens per SAE),
# TRANSCRIPTS (number of generated chats), EXPANSION, K, MODEL (default: embedded),
# TRAIN_ARGS (more train-sae flags), PACK_DIR (also pack each finished SAE, with
# float16 weights, as sae-lL.tar there: for copying results off a remote machine).
# The shipped SAE was trained with this script on a GPU; on the CPU the same
# command works with smaller TOKENS (about 1,000 tokens/s for collection).
set -euo pipefail
CORPUS=${1:?corpus JSONL (python scripts/build_corpus.py writes one)}
OUTDIR=${2:?output folder}
DEVICE=${3:-cpu}
LAYERS=${LAYERS:-"10 15 20"}
TOKENS=${TOKENS:-2000000}
TRANSCRIPTS=${TRANSCRIPTS:-3000}
EXPANSION=${EXPANSION:-8}
K=${K:-32}
PY=${PYTHON:-python3}
MODEL_ARGS=()
[ -n "${MODEL:-}" ] && MODEL_ARGS=(--model "$MODEL")
mkdir -p "$OUTDIR"

if [ "$TRANSCRIPTS" -gt 0 ]; then
  "$PY" scripts/generate_transcripts.py "${MODEL_ARGS[@]}" --corpus "$CORPUS" --n "$TRANSCRIPTS" \
    --batch-size "${GEN_BATCH:-256}" --max-new-tokens "${GEN_TOKENS:-128}" --device "$DEVICE" \
    -o "$OUTDIR/transcripts.jsonl"
  # Shuffle the transcripts into the corpus: the trainer's buffer mixes only nearby documents.
  "$PY" - "$CORPUS" "$OUTDIR/transcripts.jsonl" "$OUTDIR/train_corpus.jsonl" <<'PYEOF'
import random, sys
lines = [l for f in sys.argv[1:3] for l in open(f, encoding="utf-8") if l.strip()]
random.Random(0).shuffle(lines)
open(sys.argv[3], "w", encoding="utf-8").writelines(lines)
PYEOF
else
  cp "$CORPUS" "$OUTDIR/train_corpus.jsonl"
fi

for L in $LAYERS; do
  "$PY" -m auditor.cli train-sae "${MODEL_ARGS[@]}" --hookpoint "blocks.$L.hook_resid_post" \
    --corpus "$OUTDIR/train_corpus.jsonl" --tokens "$TOKENS" --expansion "$EXPANSION" --k "$K" \
    --device "$DEVICE" --out "$OUTDIR/sae-l$L" ${TRAIN_ARGS:-}
  if [ -n "${PACK_DIR:-}" ]; then
    mkdir -p "$PACK_DIR/sae-l$L"
    "$PY" -c 'import sys, torch; from auditor.sae import load_sae; load_sae(sys.argv[1]).to(torch.float16).save(sys.argv[2])' \
      "$OUTDIR/sae-l$L" "$PACK_DIR/sae-l$L"
    cp "$OUTDIR/sae-l$L"/training_report.json "$OUTDIR/sae-l$L"/TRAINING_REPORT.md "$PACK_DIR/sae-l$L/"
    tar -C "$PACK_DIR" -cf "$PACK_DIR/sae-l$L.tar" "sae-l$L" && rm -r "${PACK_DIR:?}/sae-l$L"
  fi
done
rm -f "$OUTDIR/train_corpus.jsonl"
