# Sourced by scripts/gpu_check_*.sh: run from the repository root without installing the package.
# kernels/ is the package siasam_kernels once installed; uninstalled, a link under a temporary
# folder on the path gives it that name.
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
KP=$(mktemp -d) && ln -s "$PWD/kernels" "$KP/siasam_kernels"
export PYTHONPATH="${PYTHONPATH:-}:$PWD:$KP" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
