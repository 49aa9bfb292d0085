#!/usr/bin/env bash
# Download, here, the wheels that bench/gpu/run.sh installs on the lent GPU machine (Python 3.12,
# x86-64, no package index there) into .whl/ at the repository root (git-ignored; ~60 MB, under the
# device tool's 64 MiB working-tree limit). The GPU image has torch, numpy, Pillow, sentencepiece,
# safetensors, tokenizers and huggingface-hub, but not these.
set -euo pipefail
cd "$(dirname "$0")/../.."
rm -rf .whl && mkdir .whl
pinned=()
for name in diffusers transformers av peft; do
  pinned+=("$(grep -h "^$name==" requirements/inference.txt)")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  "${pinned[@]}" torchao==0.18.0 importlib_metadata pytest pluggy iniconfig pygments packaging
du -sh .whl && ls .whl
