#!/usr/bin/env bash
# FlashAttention-4 (diffgen's fa4 extra) for the offline device machine, whose carry is limited to 64 MiB a call:
#   here:        bash bench/fa4_device.sh pack .devcarry/fa4      # pip-downloads the wheels (Python 3.12,
#                                                                 # manylinux x86_64), splits them in two halves
#   call 1:      carry .devcarry/fa4/a; run  bash bench/fa4_device.sh stage
#   call 2:      carry .devcarry/fa4/b (same warm machine: within its idle release, ~30 s);
#                run  source <(bash bench/fa4_device.sh install) && python -m pytest -m gpu tests/test_attention_backends.py
# "install" unpacks into /tmp/fa4site and prints the PYTHONPATH export (the cutlass package's .pth file is not read
# from PYTHONPATH, so its dsl_packages folder is added too). Used for docs/benchmarks.md's FlashAttention-4 section.
set -euo pipefail
VERSIONS=(flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1
          nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 apache-tvm-ffi==0.1.15.post2
          torch-c-dlpack-ext==0.1.5 quack-kernels==0.6.5)  # the versions measured on 2026-11-27
SITE=/tmp/fa4site
case "${1:-}" in
  pack)
    dest=${2:?destination folder}
    work=$(mktemp -d)
    mkdir -p "$dest/a" "$dest/b" "$work/wheels" "$work/libs"
    pip download -q --no-deps --pre --only-binary=:all: --platform manylinux_2_28_x86_64 --python-version 3.12 \
        -d "$work/wheels" "${VERSIONS[@]}"
    # the CUDA 13 library wheel (92 MB) alone is over the limit: repacked with xz and split across the two calls
    libs=$(ls "$work"/wheels/nvidia_cutlass_dsl_libs_cu13-*.whl)
    python3 -m zipfile -e "$libs" "$work/libs" && rm "$libs"
    tar -C "$work/libs" -cf - . | xz -9e -T0 > "$work/libs.tar.xz"
    split -b 45M "$work/libs.tar.xz" "$work/libs.part."
    mv "$work"/libs.part.aa "$dest/a/" && mv "$work"/libs.part.a[b-z] "$work"/wheels/*.whl "$dest/b/"
    rm -rf "$work"
    du -sh "$dest/a" "$dest/b"
    ;;
  stage)  # call 1: keep the first half where call 2 finds it
    mkdir -p /tmp/fa4-parts && cp .devcarry/fa4/a/libs.part.* /tmp/fa4-parts/
    ;;
  install)  # call 2
    if [ ! -d "$SITE/flash_attn" ]; then
      mkdir -p "$SITE"
      cat /tmp/fa4-parts/libs.part.* .devcarry/fa4/b/libs.part.* | xz -d -T0 | tar -x -C "$SITE"
      for wheel in .devcarry/fa4/b/*.whl; do python3 -m zipfile -e "$wheel" "$SITE" >&2; done
    fi
    echo "export PYTHONPATH=$SITE:$SITE/nvidia_cutlass_dsl/dsl_packages:\${PYTHONPATH:-}"
    ;;
  *)
    sed -n '2,8p' "$0"; exit 2
    ;;
esac
