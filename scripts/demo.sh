#!/usr/bin/env bash
# The main job on the built-in rendered digits (no downloads): train the CNN to explain, a DUQ
# model (DISC's manifold consistency, evaluate's certainty), an independent wider CNN (oracle and
# feature network) and an autoencoder (LatentAttack's generator); explain test images of the CNN
# with the pixel baseline, DISC and LatentAttack; evaluate the three runs together (validity,
# oracle agreement, closeness, realism against real images of the target class) and write the
# HTML report. Runs are tracked with W&B offline.
#   bash scripts/demo.sh [OUTPUT_DIR]        (default: runs/demo-<timestamp>, never reused)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/demo-$(date +%Y%m%d-%H%M%S)}
if [ -e "$out" ]; then echo "demo: $out exists; pass a new folder" >&2; exit 2; fi
export WANDB_SILENT=true
C=configs
DATA="--config $C/data/rendered.yaml --data.init_args.train_size 8000 --data.init_args.val_size 1000"

fit() {  # fit NAME MODEL_CONFIG EPOCHS [extra args...]: best checkpoint in $out/NAME/checkpoints/best.ckpt
  local name=$1 cfg=$2 epochs=$3 monitor=${MONITOR:-val/acc} mode=${MODE:-max}
  shift 3
  lit-cf fit $DATA --config "$C/model/$cfg" --config $C/trainer/default.yaml --config $C/logger/wandb.yaml \
    --trainer.logger.init_args.save_dir "$out/$name" --trainer.default_root_dir "$out/$name" \
    --trainer.max_epochs "$epochs" --trainer.enable_progress_bar false --trainer.enable_model_summary false \
    --trainer.callbacks+=ModelCheckpoint --trainer.callbacks.dirpath "$out/$name/checkpoints" \
    --trainer.callbacks.filename best --trainer.callbacks.monitor "$monitor" --trainer.callbacks.mode "$mode" "$@"
}

echo "== 1/4 train: the CNN to explain, a DUQ model, an independent oracle, an autoencoder"
fit cnn cnn.yaml 2
fit duq duq_cnn.yaml 2
fit oracle cnn_wide.yaml 1 --seed_everything 1
MONITOR=val/loss MODE=min fit autoencoder autoencoder.yaml 3 --model.init_args.output_activation identity

echo "== 2/4 test figures of the CNN"
lit-cf test --config $C/data/rendered.yaml --config $C/model/cnn.yaml --trainer.logger false \
  --trainer.enable_progress_bar false --trainer.default_root_dir "$out/cnn" --ckpt_path "$out/cnn/checkpoints/best.ckpt"

echo "== 3/4 explain 16 correctly classified test images of the CNN (target: most likely other class)"
explain() {  # explain METHOD [extra args...]
  local method=$1
  shift
  lit-cf explain --config $C/data/rendered.yaml --config "$C/explain/$method.yaml" --trainer.logger false \
    --trainer.enable_progress_bar false --trainer.default_root_dir "$out" \
    --classifier "$out/cnn/checkpoints/best.ckpt" --output_dir "$out/explain/$method" \
    --num_queries 16 --select correct --chunk_size 16 "$@"
}
explain pixel
explain disc --model.init_args.duq "$out/duq/checkpoints/best.ckpt" --model.init_args.prior inr --model.init_args.fit_steps 200
explain latent_attack --model.init_args.generator "$out/autoencoder/checkpoints/best.ckpt" \
  --model.init_args.loss log_prob --model.init_args.pixel_weight 0.1

echo "== 4/4 evaluate the three runs together and write the report"
lit-cf evaluate --config $C/data/rendered.yaml --trainer.logger false --trainer.enable_progress_bar false \
  --runs "[$out/explain/pixel, $out/explain/disc, $out/explain/latent_attack]" \
  --oracles "{wide_cnn: $out/oracle/checkpoints/best.ckpt}" --feature_network "$out/oracle/checkpoints/best.ckpt" \
  --duq "$out/duq/checkpoints/best.ckpt" --reference test --cout_steps 10 --output_dir "$out/evaluate"
echo
cat "$out/evaluate/metrics.md"
echo
echo "Report: $out/evaluate/report.html   Grids: $out/explain/*/grids/   W&B offline runs: $out/*/wandb ('wandb sync' later)"
