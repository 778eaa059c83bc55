#!/usr/bin/env bash
# Installs the CUDA compilers from PyPI into .cuda-venv (no GPU, no driver, no root needed):
#   * CUDA 13 nvcc + ptxas (nvidia-cuda-nvcc, -crt, -runtime, -cccl) for scripts/cuda-compile,
#     which builds every kernel for every architecture so that ptxas validates each instruction;
#   * CUDA 12 NVRTC (nvidia-cuda-nvrtc-cu12), the library the runtime compiles its kernels with
#     at start-up, so that the run-time compile path is tested on machines without a GPU.
# Prints the environment to use them: `eval "$(bash scripts/cuda-toolchain.sh)"`.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.cuda-venv
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv" >&2
fi
# Pinned: the versions CI was validated with (the wheels' directory layout is relied on below).
"$venv/bin/pip" install -q --disable-pip-version-check \
  nvidia-cuda-nvcc==13.5.37 nvidia-cuda-crt==13.5.37 nvidia-cuda-runtime==13.5.37 \
  nvidia-nvvm==13.5.37 nvidia-cuda-cccl==13.3.5.0.6 nvidia-cuda-nvrtc-cu12==12.9.86 >&2
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
nvcc="$site/nvidia/cu13/bin/nvcc"
nvrtc_lib="$site/nvidia/cuda_nvrtc/lib"
[ -x "$nvcc" ] || { echo "nvcc not found under $site/nvidia" >&2; exit 1; }
[ -e "$nvrtc_lib/libnvrtc.so.12" ] || { echo "libnvrtc.so.12 not found in $nvrtc_lib" >&2; exit 1; }
echo "export PATCH_NVCC='$nvcc'"
echo "export LD_LIBRARY_PATH='$nvrtc_lib'\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
