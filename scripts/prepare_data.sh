#!/usr/bin/env bash
# Copy staged datasets (read-only, e.g. ../shared/data) into a writable data root, so that
# torchvision-style loaders can unpack the .gz files beside themselves.
#   bash scripts/prepare_data.sh [SOURCE=../shared/data] [DEST=data]
set -euo pipefail
src=${1:-../shared/data}
dest=${2:-data}
mkdir -p "$dest"
for name in MNIST FashionMNIST celeba; do
  if [ -d "$src/$name" ] && [ ! -e "$dest/$name" ]; then
    cp -r "$src/$name" "$dest/$name"
    chmod -R u+w "$dest/$name"
    echo "copied $src/$name -> $dest/$name"
  elif [ -e "$dest/$name" ]; then
    echo "kept existing $dest/$name"
  fi
done
