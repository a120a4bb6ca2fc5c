#!/usr/bin/env bash
# Reproduce the shipped demo weights (src/controlnext/assets/demo) and their model cards, on CPU.
#   bash scripts/train_demo_all.sh [BUILD_DIR]        (default build/demo; about 2 h on one thread)
# ASSETS=DIR writes the weights, cards and metrics.json there instead of into the package (to check a rerun).
# Step counts are fixed (not time budgets), so a rerun gives the same weights on the same thread count.
# A stage whose output is complete is not run again (an interrupted stage restarts from its beginning).
set -euo pipefail
BUILD=${1:-build/demo}
THREADS=${THREADS:-1}
VAE_STEPS=${VAE_STEPS:-1983}
UNET_STEPS=${UNET_STEPS:-7260}
ANNEAL_STEPS=${ANNEAL_STEPS:-6000}
MODULE_STEPS=${MODULE_STEPS:-3000}
# Edges: one residual block, so the features sit on the 16x16 latent grid of this 4x VAE (thin lines need it);
# masks: the light layout's two blocks (features at 1/8, pooled to the latent grid).
EDGES_CONFIG='{"embedding_channels": [16, 16, 32], "block_in_channels": [32], "block_out_channels": [64], "groups": [4], "mid_groups": 8}'
MASK_CONFIG='{"embedding_channels": [16, 16, 32], "block_in_channels": [32, 32], "block_out_channels": [32, 64], "groups": [4, 8], "mid_groups": 8}'
mkdir -p "$BUILD"
# A stage is done when its record says so at the top level (the nested "init" record of stage 2 is stage 1's).
done_() { python -c 'import json, sys; sys.exit(not json.load(open(sys.argv[1])).get("final"))' "$1/training.json" 2>/dev/null; }

# 1. Base model: VAE, then text encoder + UNet (v-prediction) at a constant LR, in the diffusers SD layout.
done_ "$BUILD/base_stage1" || python scripts/train_base.py "$BUILD/base_stage1" --seed 0 --threads "$THREADS" \
    --vae-steps "$VAE_STEPS" --n-train 16000 --unet-steps "$UNET_STEPS"

# 2. Continue the text encoder + UNet with a cosine LR anneal (fresh data seed): sharper shapes (docs/demo.md).
# A base/ without "init" is the final output of an older version of this script (no anneal): it is replaced, and
# modules trained on it are removed so that step 3 retrains them on the new base.
if ! { done_ "$BUILD/base" && grep -q '"init"' "$BUILD/base/training.json"; }; then
    rm -rf "$BUILD/edges" "$BUILD/mask"
    python scripts/train_base.py "$BUILD/base" --init "$BUILD/base_stage1" --seed 1 --threads "$THREADS" \
        --n-train 16000 --unet-steps "$ANNEAL_STEPS" --lr-schedule cosine
fi

# 3. One ControlNeXt module per condition, with `controlnext train` on a 4000-sample shapes dataset (seed 1): the
# published recipe, the module plus the UNet's attention output projections (`to_out`), exported as deltas.
for COND in edges mask; do
    if [ "$COND" = edges ]; then MODULE_CONFIG=$EDGES_CONFIG; else MODULE_CONFIG=$MASK_CONFIG; fi
    [ -f "$BUILD/data_$COND/dataset.json" ] \
        || controlnext make-dataset "$BUILD/data_$COND" --n 4000 --seed 1 --condition "$COND"
    CMD=(controlnext train --model "$BUILD/base" --dataset "$BUILD/data_$COND"
         --controlnext-variant sd15-training --controlnext-config "$MODULE_CONFIG" --train-unet to_out
         --resolution 64 --caption-dropout 0.1 --train-batch-size 16 --learning-rate 1e-3 --unet-learning-rate 1e-3
         --max-train-steps "$MODULE_STEPS" --checkpointing-steps 500 --seed 0 --cpu --cpu-threads "$THREADS"
         --save-unet-as deltas --output-dir "$BUILD/$COND")
    [ -f "$BUILD/$COND/train_summary.json" ] || "${CMD[@]}"
    printf '%q ' "${CMD[@]}" > "$BUILD/$COND/command.txt"
done

# 4. Copy into the package, measure (colour/shape accuracy, control fidelity), write the model cards.
python scripts/train_demo_ship.py "$BUILD" --threads "$THREADS" ${ASSETS:+--assets "$ASSETS"}
