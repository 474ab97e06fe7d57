#!/usr/bin/env bash
# Every GPU figure lit-cf owes, in one prepared run of at most 9 minutes on one CUDA GPU.
#
#   bash scripts/device_checks.sh --prepare        # here, on the CPU machine, once: wheels + data
#   bash scripts/device_checks.sh OUT_DIR          # on the GPU machine (or OUT_DIR from $OUT)
#   bash scripts/device_checks.sh --dry-run OUT    # on CPU at tiny sizes (tests/test_device_checks.py)
#
# Steps (each under its own time limit; a failing step is recorded and the others still run):
#   1. bench_explain on the GPU, fp32 and bf16: counterfactuals/s, batched / per-image ratio
#      (the dry mode runs bf16 only, at tiny sizes)
#   2. bench_fit: seconds per epoch of DUQ vs a CNN on the same network (+ a torch.profiler table)
#   3. the DUQ paper protocol (`lit-cf study --config configs/study/repro_duq.yaml`) on
#      Fashion-MNIST and MNIST, time-boxed: the curve says how many of the 30 epochs were reached
#   4. diffusion, only where configs/model/ddpm_mnist.yaml exists: scripts/device_diffusion.sh
#      when present (the diffusion study's own hook: args OUT_FILE DATA_ROOT SECONDS DRY), else
#      train ddpm_mnist time-boxed and time `lit-cf explain` with each of dvce/fastdime/ace that
#      has a config
# OUT_DIR receives at most 8 files: summary.md, log.txt, bench_explain_fp32.json,
# bench_explain_bf16.json, bench_fit.json, duq_fashion_mnist.json, duq_mnist.json, diffusion.json.
#
# Environment: DATA_ROOT (default .device_data, holding MNIST/raw and FashionMNIST/raw, writable),
# DEVICE_CHECKS_DRY=1 (same as --dry-run), DEVICE_CHECKS_BUDGET (seconds, default 530), PYTHON.
# The GPU machine lacks jsonargparse (LightningCLI) and diffusers: --prepare downloads the wheels
# into .whl/ and copies the gzipped MNIST/Fashion-MNIST (~43 MB) into .device_data/; carry both
# (device run: carry [".whl", ".device_data"], command `bash scripts/device_checks.sh`).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
DRY=${DEVICE_CHECKS_DRY:-0}
PREPARE=0
OUT_DIR=${OUT:-}
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    --prepare) PREPARE=1 ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d'; exit 0 ;;
    -*) echo "device_checks: unknown option $arg (see --help)" >&2; exit 2 ;;
    *) OUT_DIR=$arg ;;
  esac
done
PY=${PYTHON:-$(command -v python3 || command -v python)}

if [ "$PREPARE" = 1 ]; then
  # wheels of what the GPU image lacks, at the versions installed here (pure-Python packages)
  mkdir -p .whl
  pkgs=$("$PY" - <<'EOF'
import importlib.metadata as md
names = ["jsonargparse", "docstring_parser", "typeshed_client", "diffusers", "importlib_metadata", "lazy-importer"]
out = []
for n in names:
    try:
        out.append(f"{n}=={md.version(n)}")
    except md.PackageNotFoundError:
        pass
print(" ".join(out))
EOF
)
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: -d .whl $pkgs || { echo "device_checks: pip download failed" >&2; exit 1; }
  for ds in MNIST FashionMNIST; do
    src=${PREPARE_DATA_FROM:-/work/data}/$ds/raw
    [ -d "$src" ] || { echo "device_checks: $src not found (set PREPARE_DATA_FROM)" >&2; exit 1; }
    mkdir -p ".device_data/$ds/raw" && cp "$src"/*.gz ".device_data/$ds/raw/"
  done
  grep -qx '/.device_data/' "$(git rev-parse --git-path info/exclude)" 2>/dev/null \
    || echo '/.device_data/' >> "$(git rev-parse --git-path info/exclude)"
  du -sh .whl .device_data
  echo "prepared: run on the GPU machine with carry [\".whl\", \".device_data\"]: bash scripts/device_checks.sh"
  exit 0
fi

[ -n "$OUT_DIR" ] || { echo "device_checks: give the output folder as an argument or in \$OUT" >&2; exit 2; }
if [ -e "$OUT_DIR" ] && [ -n "$(ls -A "$OUT_DIR" 2>/dev/null)" ]; then
  echo "device_checks: $OUT_DIR is not empty; give a new or empty folder" >&2; exit 2
fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
START=$(date +%s)
BUDGET=${DEVICE_CHECKS_BUDGET:-530}
STATUS=$WORK/status.tsv
: > "$STATUS"
left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# checks before anything is written to OUT_DIR
if ls .whl/*.whl >/dev/null 2>&1 && ! "$PY" -c "import jsonargparse, diffusers" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" .whl/*.whl >&2
  export PYTHONPATH=$WORK/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$REPO:${PYTHONPATH:-} PYTHONUNBUFFERED=1
if ! "$PY" -c "import jsonargparse, docstring_parser, typeshed_client" 2>"$WORK/import.txt"; then
  tail -2 "$WORK/import.txt" >&2
  echo "device_checks: lit_cf's dependencies do not import; on the GPU machine carry .whl from --prepare" >&2
  exit 1
fi
if [ "$DRY" != 1 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "device_checks: no CUDA GPU visible; on CPU use --dry-run" >&2; exit 1
fi
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
LOG=$OUT_DIR/log.txt

if [ "$DRY" = 1 ]; then
  ACC=cpu; DATA=$WORK/data
  "$PY" -c "
from tests.fixtures import write_idx_dataset
write_idx_dataset('$DATA', name='FashionMNIST', n_train=64, n_test=32)
write_idx_dataset('$DATA', name='MNIST', n_train=64, n_test=32, seed=1)" >>"$LOG" 2>&1
  EXPLAIN_SIZE=(--images 8 --steps 2 --chunk 4 --per-image-subset 2 --train-size 64 --skip-rss --matmul-size 128)
  FIT_SIZE=(--train-size 16 --epochs 1 --profile 1 --models duq)
  DUQ_SIZE=(--settings.epochs 2 --settings.overrides '{"data.init_args.val_size": 8, "data.init_args.batch_size": 16,
            "model.init_args.backbone.init_args.channels": [4, 8, 8], "model.init_args.backbone.init_args.hidden": 16,
            "model.init_args.embedding_size": 8}')
  T_EXPLAIN=120; T_FIT=120
else
  ACC=gpu; DATA=${DATA_ROOT:-$REPO/.device_data}
  EXPLAIN_SIZE=(--images 1024 --steps 50 --chunk 256 --per-image-subset 64 --skip-rss)
  FIT_SIZE=(--train-size 6400 --epochs 3 --profile 3)
  DUQ_SIZE=()
  T_EXPLAIN=100; T_FIT=120
fi
DIFFUSION=0
[ -f configs/model/ddpm_mnist.yaml ] && DIFFUSION=1
{ echo "device_checks: dry=$DRY accelerator=$ACC data=$DATA budget=${BUDGET}s diffusion=$DIFFUSION"; date -u
  git log --oneline -1 2>/dev/null; [ "$DRY" = 1 ] || nvidia-smi; } >>"$LOG" 2>&1

# step NAME SECONDS CMD...: run CMD with a hard time limit, log its output, record status and time
step() {
  local name=$1 limit=$2; shift 2
  local avail; avail=$(left)
  (( limit > avail )) && limit=$avail
  if (( limit < 10 )); then printf '%s\tskipped\t0\tno time left\n' "$name" >>"$STATUS"; return; fi
  echo "=== $name (limit ${limit}s) ===" >>"$LOG"
  local t0=$(date +%s) rc=0
  timeout -s INT -k 15 "$limit" "$@" >>"$LOG" 2>&1 || rc=$?
  local secs=$(( $(date +%s) - t0 ))
  local what=ok; (( rc == 124 )) && what=timeout; (( rc != 0 && rc != 124 )) && what="failed (exit $rc)"
  printf '%s\t%s\t%s\t%s\n' "$name" "$what" "$secs" "$limit" >>"$STATUS"
  echo "=== $name: $what after ${secs}s ===" >>"$LOG"
}

# dry mode: bf16 only (the fp32 run is the same code without autocast; each process costs ~10 s of imports)
[ "$DRY" = 1 ] || step bench_explain_fp32 "$T_EXPLAIN" "$PY" scripts/bench_explain.py --accelerator "$ACC" --precision 32-true \
  "${EXPLAIN_SIZE[@]}" --json "$OUT_DIR/bench_explain_fp32.json"
step bench_explain_bf16 "$T_EXPLAIN" "$PY" scripts/bench_explain.py --accelerator "$ACC" --precision bf16-mixed \
  "${EXPLAIN_SIZE[@]}" --json "$OUT_DIR/bench_explain_bf16.json"
step bench_fit "$T_FIT" "$PY" scripts/bench_fit.py --accelerator "$ACC" "${FIT_SIZE[@]}" --json "$OUT_DIR/bench_fit.json"

# DUQ paper protocol: both datasets share what is left, less the diffusion step's share
RESERVE=0; (( DIFFUSION )) && RESERVE=$(( DRY == 1 ? 60 : 150 ))
PER_DATASET=$(( ($(left) - RESERVE - 40) / 2 ))
(( PER_DATASET < 20 )) && PER_DATASET=20
step duq_paper_protocol $(( 2 * PER_DATASET + 40 )) "$PY" -m lit_cf study --config configs/study/repro_duq.yaml \
  --output_dir "$WORK/duq" --settings.root "$DATA" --settings.accelerator "$ACC" --settings.time_budget "$PER_DATASET" \
  "${DUQ_SIZE[@]}"
for ds in fashion_mnist mnist; do  # each dataset's figures and curve: models/duq-<dataset>-<key>/result.json
  for f in "$WORK"/duq/models/duq-"$ds"-*/result.json; do [ -f "$f" ] && cp "$f" "$OUT_DIR/duq_$ds.json"; done
done

if (( DIFFUSION )); then
  if [ -f scripts/device_diffusion.sh ]; then
    step diffusion $(( $(left) - 5 )) bash scripts/device_diffusion.sh "$OUT_DIR/diffusion.json" "$DATA" $(( $(left) - 20 )) "$DRY"
  elif [ "$DRY" = 1 ]; then
    step diffusion_config 60 "$PY" -m lit_cf fit --config configs/data/mnist.yaml --config configs/model/ddpm_mnist.yaml \
      --print_config
  else
    CLI=("$PY" -m lit_cf)
    COMMON=(--data.init_args.root="$DATA" --trainer.accelerator=gpu --trainer.logger=false --sample_grid.num_samples=0)
    step diffusion_cnn 60 "${CLI[@]}" fit --config configs/data/mnist.yaml --config configs/model/cnn.yaml "${COMMON[@]}" \
      --trainer.max_epochs=1 --trainer.default_root_dir="$WORK/cnn"
    CNN=$(ls "$WORK"/cnn/checkpoints/*.ckpt 2>/dev/null | tail -1)
    TRAIN_S=$(( $(left) - 90 ))
    step ddpm_mnist $(( TRAIN_S + 30 )) "${CLI[@]}" fit --config configs/data/mnist.yaml --config configs/model/ddpm_mnist.yaml \
      "${COMMON[@]}" --trainer.max_epochs=1000 --trainer.max_time="00:00:$(( TRAIN_S / 60 )):$(( TRAIN_S % 60 ))" \
      --trainer.default_root_dir="$WORK/ddpm" ${CNN:+--model.init_args.classifier="$CNN"}
    DDPM=$(ls "$WORK"/ddpm/checkpoints/*.ckpt 2>/dev/null | tail -1)
    for m in dvce fastdime ace; do
      [ -f "configs/explain/$m.yaml" ] && [ -n "$DDPM" ] && [ -n "$CNN" ] || continue
      step "explain_$m" 25 "${CLI[@]}" explain --config configs/data/mnist.yaml --config "configs/explain/$m.yaml" \
        --data.init_args.root="$DATA" --trainer.accelerator=gpu --model.init_args.diffusion="$DDPM" \
        --classifier="$CNN" --num_queries=64 --output_dir="$WORK/explain_$m"
    done
    "$PY" - "$STATUS" "$DDPM" "$OUT_DIR/diffusion.json" <<'EOF' >>"$LOG" 2>&1
import json, sys, torch
status, ddpm, out = sys.argv[1:]
rows = [line.rstrip("\n").split("\t") for line in open(status)]
res = {"steps": {r[0]: {"status": r[1], "seconds": int(r[2])} for r in rows
                 if r[0].startswith(("diffusion", "ddpm", "explain_"))}}
if ddpm:
    ck = torch.load(ddpm, map_location="cpu", weights_only=True)
    res["ddpm_epochs"], res["ddpm_steps"] = ck.get("epoch"), ck.get("global_step")
for name, s in res["steps"].items():
    if name.startswith("explain_") and s["status"] == "ok":
        s["counterfactuals_per_second_incl_startup"] = 64 / max(s["seconds"], 1)
json.dump(res, open(out, "w"), indent=1)
EOF
  fi
fi

# summary.md: the figures of every file, and each step's status
"$PY" - "$OUT_DIR" "$STATUS" "$DRY" "$(( $(date +%s) - START ))" <<'EOF' >>"$LOG" 2>&1
import json, sys
from pathlib import Path
out, status, dry, total = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "1", sys.argv[4]
lines = [f"# device checks{' (DRY RUN: tiny sizes on CPU, not figures)' if dry else ''}", "",
         f"total {total} s", "", "| step | status | seconds | limit |", "| --- | --- | --- | --- |"]
lines += ["| " + " | ".join(line.rstrip("\n").split("\t")) + " |" for line in open(status)]
def load(name):
    p = out / name
    return json.loads(p.read_text()) if p.exists() else None
for prec in ("fp32", "bf16"):
    b = load(f"bench_explain_{prec}.json")
    if b:
        cf = b["cf_per_second"]
        lines += ["", f"bench_explain {prec} on {b['device_name']}: engine {cf['engine']:.1f} CF/s, hand-batched "
                  f"{cf['hand_batched']:.1f}, per-image {cf['per_image']:.1f}; batched / per-image "
                  f"{b['batched_over_per_image']:.1f}x; engine / hand {b['engine_over_hand']:.2f}x"]
f = load("bench_fit.json")
if f:
    lines += ["", f"bench_fit on {f['device_name']}: DUQ / CNN {f['duq_over_cnn']:.2f}x (s/epoch: "
              + ", ".join(f"{k} {v:.2f}" for k, v in f["seconds_per_epoch"].items()) + ")"]
for ds in ("fashion_mnist", "mnist"):
    d = load(f"duq_{ds}.json")
    if d and d.get("curve"):
        last = d["curve"][-1]
        lines += ["", f"DUQ {ds}: {d['epochs_done']} epochs reached (finished: {d['finished']}), accuracy "
                  f"{last['accuracy']:.4f}, AUROC {last['auroc_ood']:.4f}, goal {d['goal']}",
                  "epoch " + " ".join(f"{r['epoch']}:{r['accuracy']:.4f}/{r['auroc_ood']:.4f}" for r in d["curve"])]
(out / "summary.md").write_text("\n".join(lines) + "\n")
EOF
cat "$OUT_DIR/summary.md" 2>/dev/null
echo "device_checks: $(ls "$OUT_DIR" | wc -l) files in $OUT_DIR"
! grep -q $'\tfailed' "$STATUS"
