# One GPU call of the hard-scenes benchmark (issue 18): train, then the quality table, everything written to $OUT.
# Run from the repository root with PYTHONPATH set. FAMILIES="llava qwen2_vl" (default) trains both side by side;
# FAMILIES=llava trains one alone (about 2x its steps: the trainers are launch-bound). Settings that worked on one
# H200 (docs/benchmark_hard.md): batch 512, lr 1e-3 (LLaVA) and 5e-4 (Qwen2-VL; 1e-3 makes it learn nothing
# visual). TRAIN_S (default 290) + TABLE_S (150) + ~80 s of start-up, evaluation and saving fit a 10-minute call.
# METHODS, SEEDS (space-separated) and SETTINGS (comma-separated, e.g. "W3A16 g128,W2A16 g64") narrow the table.
# TASK=scenes_fine trains (and tests) the variant with shades instead of read/add. SMOKE=--smoke: the same lines on
# the CPU with tiny shapes.
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 TRANSFORMERS_VERBOSITY=error NCCL_NVLS_ENABLE=0
C=${CKPT:-/tmp/hard_ckpt}; L=$OUT/log.txt; mkdir -p "$C" "$OUT"
FAMILIES=${FAMILIES:-"llava qwen2_vl"}; TRAIN_S=${TRAIN_S:-290}; TABLE_S=${TABLE_S:-150}
set -- $FAMILIES; WORKERS=$(( 14 / $# )); MODELS=()
for f in $FAMILIES; do
  lr=1e-3; [ "$f" = qwen2_vl ] && lr=5e-4
  timeout $(( TRAIN_S + 60 )) python3 examples/train_hard_vlm.py $SMOKE --family $f --task ${TASK:-scenes_hard} --out "$C/$f" \
    --json "$OUT/train_$f.json" --max-seconds "$TRAIN_S" --workers $WORKERS --batch-size 512 --lr $lr --warmup 100 \
    >>"$L" 2>&1 &
  MODELS+=("$f=$C/$f")
done
wait
IFS=, read -ra SETS <<<"${SETTINGS:-W3A16 g128,W2A16 g64,W4A16 g128,W4A8 g128}"
timeout $(( TABLE_S + 45 )) python3 examples/quality_hard.py $SMOKE --models "${MODELS[@]}" --workers 8 \
  --methods ${METHODS:-rtn gptq tlq gptq_fp tlq_fp awq mbq smoothquant} --settings "${SETS[@]}" \
  --seeds ${SEEDS:-0 1 2} --ablations ${ABLATIONS:-floor=0.3 floor=0.5 mode=modality} \
  --max-seconds "$TABLE_S" --grace 35 --json "$OUT/quality.json" --md "$OUT/quality.md" >>"$L" 2>&1
tail -c 4000 "$L"; cat "$OUT/quality.md"
