#!/usr/bin/env bash
# The wheels a lent GPU machine lacks to run benchmarks/gpu.py (it has Python 3.12, PyTorch 2.11 with CUDA 13,
# accelerate, peft, transformers, safetensors, typer, pillow, ... and nothing can be fetched there): downloaded here,
# at the versions constraints.txt pins, into .whl/ (.gitignore has it; name it in the device's carry). xformers 0.0.35
# is a 3 MB wheel that runs on PyTorch >= 2.10. On the machine, before the benchmark:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
#   python3 benchmarks/gpu.py --family zimage
set -euo pipefail
cd "$(dirname "$0")/.."
pin() { grep -i -m1 "^$1==" constraints.txt || echo "$1"; }
names=(diffusers zarr numcodecs donfig google-crc32c prodigyopt pydantic pydantic_core annotated-types
       typing-inspection importlib_metadata)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl $(for n in "${names[@]}"; do pin "$n"; done) xformers==0.0.35
ls -s --block-size=K .whl
