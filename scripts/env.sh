# Source to enter a built fem_moe stack: source scripts/env.sh [STACK_DIR]
# (default: the stack scripts/install.sh builds for these versions).
_fem_moe_stack=${1:-$(bash "$(dirname "${BASH_SOURCE[0]}")/install.sh" --print)}
export PETSC_DIR=$(ls -d "$_fem_moe_stack"/petsc-* | head -n 1) PETSC_ARCH=arch-fem-moe
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1
export OMPI_MCA_rmaps_base_oversubscribe=1
source "$_fem_moe_stack/venv/bin/activate"
unset _fem_moe_stack
