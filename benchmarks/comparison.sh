#!/usr/bin/env bash
# The literature's comparison, reproduced on synthetic thorax phantoms: every network trained by the
# same protocol (segnode train), then all scored side by side by segnode evaluate on unseen phantoms.
#
#   bash benchmarks/comparison.sh [OUT_DIR] [EPOCHS]
#
# Small on purpose so that it runs on a 2-core CPU in well under an hour: width 8, 16 phantoms of
# 32 x 128 x 128 (3 mm pixels), ce+dice loss. On real data (AAPM 2017 thoracic challenge layout, once
# downloaded), replace --data with dicom-rtstruct:/path/to/aapm2017 and drop the synthetic options;
# see `segnode train --help`. The 3D V-Net trains through the same command on patches of --patch
# voxels (32x96x96; about 30 s an epoch here).
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."
out=${1:-runs/comparison}
epochs=${2:-12}
segnode=.venv/bin/segnode
common=(--data synthetic:16 --width 8 --epochs "$epochs" --loss ce+dice --pixel-spacing 3 --crop 128
        --synthetic-shape 32x128x128 --patience 5 --seed 0 --quiet)
checkpoints=()
for arch in fcn unet unetpp attention_unet vnet segnet deeplabv3 pspnet mask_rcnn; do
    start=$(date +%s)
    "$segnode" train --arch "$arch" --out "$out/$arch" "${common[@]}"
    echo "trained $arch in $(( $(date +%s) - start )) s"
    checkpoints+=("$out/$arch/model.pt")
done
"$segnode" evaluate "${checkpoints[@]}" classical --data synthetic:5 --synthetic-shape 32x128x128 \
    --out "$out/evaluation.csv" | tee "$out/table.txt"
