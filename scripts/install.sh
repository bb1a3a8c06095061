#!/usr/bin/env bash
# Create a virtualenv, install the pinned stack, then build horovod 0.28.1 against the
# installed TensorFlow (Gloo, no MPI). Idempotent: a finished install leaves a stamp file.
#   bash scripts/install.sh [VENV_DIR]        (default .venv)
#   GPU=1 bash scripts/install.sh             (tensorflow[and-cuda] and NCCL for horovod)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
PYTHON=${PYTHON:-python3}
STAMP="$VENV/.installed"
if [ -f "$STAMP" ] && [ "$STAMP" -nt requirements.txt ] && [ "$STAMP" -nt scripts/install.sh ]; then
  echo "install: $VENV is up to date"; exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip setuptools wheel
if [ "${GPU:-0}" = 1 ]; then
  sed 's/^tensorflow-cpu==/tensorflow[and-cuda]==/' requirements.txt > "$VENV/requirements-gpu.txt"
  $PIP install -q -r "$VENV/requirements-gpu.txt"
else
  $PIP install -q -r requirements.txt
fi
# tf-keras declares a dependency on the `tensorflow` package, which would install a second,
# CUDA-flavoured TensorFlow over tensorflow-cpu: install it without dependencies.
$PIP install -q --no-deps tf-keras==2.18.0
if ! "$VENV/bin/python" -c "import horovod.tensorflow" 2>/dev/null; then
  # horovod's CMake files predate cmake 4; a 3.x cmake in the venv keeps the build stable.
  $PIP install -q "cmake>=3.18,<4"
  echo "install: building horovod 0.28.1 (about 6 minutes on 2 cores)..."
  export PATH="$(cd "$VENV/bin" && pwd):$PATH"
  export HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 \
         HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1
  [ "${GPU:-0}" = 1 ] && export HOROVOD_GPU_OPERATIONS=NCCL
  $PIP install -q --no-build-isolation horovod==0.28.1
fi
"$VENV/bin/python" -c "import utils.compat, tensorflow as tf, tensorpack, horovod.tensorflow as hvd; \
print('install: TensorFlow', tf.__version__, '| tensorpack', tensorpack.__version__, '| horovod ok')"
touch "$STAMP"
