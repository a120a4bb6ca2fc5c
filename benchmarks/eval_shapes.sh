#!/usr/bin/env bash
# `controlnext eval` on the shapes world for the three methods of the convergence study, in one table:
# ControlNeXt (the published recipe: module + UNet to_out), diffusers' ControlNet and diffusers' T2I-Adapter, each
# trained by the study's loop (scripts/train_demo_controlnext.py) on the shipped base with the study's setup at its
# best LR (docs/convergence.md: 400 steps, batch 16, lr 3e-3, 4000 samples of shapes seed 1, training seed SEED), then
# evaluated with the same cases, seeds and sampling (the demo's: 20 steps, guidance 3).
#   bash benchmarks/eval_shapes.sh [BUILD_DIR]      (default build/eval_shapes/seed$SEED; about 10 min on one CPU thread)
# SEED=S (default 0) sets the training seed of all three methods (the data and evaluation cases stay the same).
set -euo pipefail
SEED=${SEED:-0}
BUILD=${1:-build/eval_shapes/seed$SEED}
BASE=src/controlnext/assets/demo/base
N=${N:-32}
for M in cross_norm_unet controlnet t2i_adapter; do
    [ -f "$BUILD/$M/training.json" ] || python scripts/train_demo_controlnext.py "$BASE" "$BUILD/$M" --condition edges \
        --method "$M" --steps 400 --batch 16 --lr 3e-3 --n 4000 --data-seed 1 --seed "$SEED" --save-every 400 --threads 1
done
controlnext eval --model "$BASE" --condition edges --n "$N" --threads 1 --json -o "$BUILD/eval" \
    --method controlnext --controlnext "$BUILD/cross_norm_unet/controlnext.safetensors" \
    --unet-weights "$BUILD/cross_norm_unet/unet_weight_increasements.safetensors" \
    --method controlnet --controlnext "$BUILD/controlnet/controlnet" \
    --method t2i-adapter --controlnext "$BUILD/t2i_adapter/t2i_adapter" | tee "$BUILD/eval.txt"
