#!/usr/bin/env bash
# Create ./.venv and install riemann-diffusion into it (editable), CPU torch by default.
#   EXTRAS=test|demo|"test,demo"   optional dependency groups (default: test)
#   TORCH_SPEC="torch==2.13.0"     what to install for torch first; GPU users: see README
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# pip's output minus this machine's noise about absent local index folders; pip's exit status is kept.
pip_q() {
  local out status=0
  out=$(.venv/bin/python -m pip install -q --disable-pip-version-check "$@" 2>&1) || status=$?
  printf '%s\n' "$out" | grep -v -e "is ignored: it is neither a file nor a directory" -e '^$' || true
  return "$status"
}
pip_q "${TORCH_SPEC:-torch==2.13.0}"
pip_q -c constraints.txt -e ".[${EXTRAS:-test}]"
.venv/bin/python -c "import torch, diffusers, riemann_diffusion; print('riemann-diffusion', riemann_diffusion.__version__, '| torch', torch.__version__, '| diffusers', diffusers.__version__)"
