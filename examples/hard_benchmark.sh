# One GPU call: train both hard-scenes benchmark models side by side, then the quality table (issue 18).
# Run from the repository root with PYTHONPATH set and $OUT an output folder; about 8 minutes on one H200
# (training 225 s + eval/save, table 180 s + 30 s grace; hard caps 280 s + 240 s). SMOKE=--smoke: the CPU check.
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 TRANSFORMERS_VERBOSITY=error NCCL_NVLS_ENABLE=0
C=${CKPT:-/tmp/hard_ckpt}; L=$OUT/log.txt; mkdir -p "$C" "$OUT"
for f in llava qwen2_vl; do
  timeout 280 python3 examples/train_hard_vlm.py $SMOKE --family $f --out "$C/$f" --json "$OUT/train_$f.json" \
    --max-seconds 225 --workers 6 >>"$L" 2>&1 &
done
wait
timeout 240 python3 examples/quality_hard.py $SMOKE --models llava="$C/llava" qwen2_vl="$C/qwen2_vl" --workers 8 \
  --max-seconds 180 --grace 30 --json "$OUT/quality.json" --md "$OUT/quality.md" >>"$L" 2>&1
tail -c 4000 "$L"; cat "$OUT/quality.md"
