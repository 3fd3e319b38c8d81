#!/usr/bin/env bash
# The wheels a GPU machine without network needs for `make gpu-check`, into .whl/ (ignored by git;
# name it in the device call's carry). Run here, where pip reaches the registry:
#
#   bash launch/gpu_wheels.sh [DIR]          # default DIR: .whl
#
# deepspeed ships only an sdist: it is built here into a pure-Python wheel with every op disabled
# (DS_BUILD_OPS=0: ops JIT-compile on first use; training uses torch's fused AdamW, so none is
# compiled), plus the packages it needs that the GPU image lacks (hjson, pydantic and its parts).
# bitsandbytes (QLoRA) and liger-kernel (fused kernels) come as binary wheels for the GPU machine's
# Python (3.12, x86-64; device README / KINDS.md). The whole working tree travels in 64 MiB: the
# bitsandbytes wheel alone is ~41 MiB, so the script stops if DIR grows past WHEELS_MAX_MIB.
set -euo pipefail
DIR=${1:-.whl}
PYVER=${GPU_PYTHON_VERSION:-3.12}
MAX_MIB=${WHEELS_MAX_MIB:-56}
mkdir -p "$DIR"

DS_BUILD_OPS=0 DS_ACCELERATOR=cpu python3 -m pip wheel -q --no-deps --no-build-isolation --no-cache-dir \
    --no-binary deepspeed -w "$DIR" deepspeed==0.19.8

python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d "$DIR" \
    bitsandbytes==0.50.2 liger-kernel==0.8.5 \
    hjson==3.1.0 pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2

ls -la "$DIR"
total_kib=$(du -sk "$DIR" | cut -f1)
echo "wheels: $((total_kib / 1024)) MiB in $DIR (limit $MAX_MIB MiB; the working tree travels in 64 MiB)"
if [ "$total_kib" -gt $((MAX_MIB * 1024)) ]; then
    echo "error: $DIR is over $MAX_MIB MiB; remove bitsandbytes-*.whl (the QLoRA row is then skipped)" >&2
    exit 1
fi
