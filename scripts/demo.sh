#!/usr/bin/env bash
# The main job on the built-in rendered digits (no downloads): train a CNN and a DUQ model,
# print their test figures, then explain a handful of test images of the CNN with the pixel
# and DeepInversion methods and point to the grids. Runs are tracked with W&B offline.
#   bash scripts/demo.sh [OUTPUT_DIR]        (default: runs/demo-<timestamp>, never reused)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/demo-$(date +%Y%m%d-%H%M%S)}
if [ -e "$out" ]; then echo "demo: $out exists; pass a new folder" >&2; exit 2; fi
export WANDB_SILENT=true
C=configs

echo "== 1/4 train the CNN classifier (rendered digits)"
lit-cf fit --config $C/data/rendered.yaml --config $C/model/cnn.yaml --config $C/trainer/default.yaml \
  --config $C/logger/wandb.yaml --trainer.logger.init_args.save_dir "$out/cnn" --trainer.default_root_dir "$out/cnn" --trainer.max_epochs 2 \
  --trainer.callbacks+=ModelCheckpoint --trainer.callbacks.dirpath "$out/cnn/checkpoints" \
  --trainer.callbacks.filename best --trainer.callbacks.monitor val/acc --trainer.callbacks.mode max
echo "== 2/4 train the DUQ model (paper's Fashion-MNIST settings, shorter run)"
lit-cf fit --config $C/data/rendered.yaml --config $C/model/duq_cnn.yaml --config $C/trainer/default.yaml \
  --config $C/logger/wandb.yaml --trainer.logger.init_args.save_dir "$out/duq" --trainer.default_root_dir "$out/duq" --trainer.max_epochs 2 --data.init_args.train_size 6000 \
  --trainer.callbacks+=ModelCheckpoint --trainer.callbacks.dirpath "$out/duq/checkpoints" \
  --trainer.callbacks.filename best --trainer.callbacks.monitor val/acc --trainer.callbacks.mode max

echo "== 3/4 test figures"
for m in cnn duq; do
  cfg=$C/model/cnn.yaml; [ $m = duq ] && cfg=$C/model/duq_cnn.yaml
  lit-cf test --config $C/data/rendered.yaml --config $cfg --trainer.logger false \
    --trainer.default_root_dir "$out/$m" --ckpt_path "$out/$m/checkpoints/best.ckpt"
done

echo "== 4/4 explain 16 test images of the CNN with both methods"
for method in pixel deepinversion; do
  lit-cf explain --config $C/data/rendered.yaml --config $C/explain/$method.yaml --trainer.logger false \
    --trainer.default_root_dir "$out" --classifier "$out/cnn/checkpoints/best.ckpt" \
    --output_dir "$out/explain/$method" --num_queries 16 --chunk_size 16
done
echo
echo "Counterfactual grids (query | counterfactual | signed difference):"
ls "$out"/explain/*/grids/*.png
echo "Manifests: $out/explain/*/manifest.jsonl   W&B offline runs: $out/{cnn,duq}/wandb (upload later with 'wandb sync')"
