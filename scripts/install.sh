#!/usr/bin/env bash
# Install the whole fem_moe stack from PyPI + Debian apt only, unattended and idempotently.
#
#   scripts/install.sh            build (or reuse) the stack, install fem_moe (editable) into it
#   scripts/install.sh --print    print the stack directory and exit
#
# The stack (PETSc built from its PyPI sdist, a venv with petsc4py/mpi4py/h5py built against it,
# firedrake, pyadjoint-ad, torch) lives OUTSIDE the repository, in a directory keyed by the
# versions below, so every clone on this machine shares it and a second run only re-checks.
# Every step prints its name and wall time; a failing step names itself and its log file.
# Environment: FEM_MOE_CACHE (default ~/.cache/fem_moe) chooses where stacks live.
set -euo pipefail

PETSC_VERSION=3.26.0          # what firedrake 2026.10.0 pins (petsc4py==3.26.0)
FIREDRAKE_VERSION=2026.10.0
PYADJOINT_VERSION=2026.10.0   # PyPI name pyadjoint-ad ("pyadjoint" is an unrelated package)
MPI4PY_VERSION=4.1.2
H5PY_VERSION=3.16.0
TORCH_VERSION=2.13.0          # whatever build the index resolves: CPU here, CUDA on a GPU workstation
VTK_VERSION=9.7.2             # ParaView output (firedrake.VTKFile)
SPHINX_VERSION=9.0.4          # the docs (docs/), with MyST Markdown
MYST_VERSION=5.2.0
RUFF_VERSION=0.17.5           # the linter CI runs before the tests
RECIPE_REVISION=1             # bump when the recipe below changes in a way that needs a rebuild
PY_TAG=$(python3 -c 'import sys; print(f"py{sys.version_info[0]}{sys.version_info[1]}")')

KEY="petsc${PETSC_VERSION}-fd${FIREDRAKE_VERSION}-torch${TORCH_VERSION}-${PY_TAG}-r${RECIPE_REVISION}"
CACHE=${FEM_MOE_CACHE:-$HOME/.cache/fem_moe}
STACK=$CACHE/stack-$KEY
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

if [[ ${1:-} == --print ]]; then echo "$STACK"; exit 0; fi

PETSC_DIR=$STACK/petsc-$PETSC_VERSION
PETSC_ARCH=arch-fem-moe
VENV=$STACK/venv
LOGS=$STACK/logs
DONE=$STACK/done
mkdir -p "$LOGS" "$DONE"

export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1
export PETSC_DIR PETSC_ARCH
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

# Two concurrent installs into one stack would corrupt it: serialise on a lock file.
exec 9>"$STACK/.lock"
flock 9

T0=$(date +%s)
say() { printf '[fem_moe install %5ss] %s\n' "$(( $(date +%s) - T0 ))" "$*"; }

# step NAME FUNCTION: run FUNCTION once per stack (a stamp marks success), logging to logs/NAME.log.
step() {
    local name=$1 fn=$2 log=$LOGS/$1.log t
    if [[ -e $DONE/$name ]]; then say "$name: cached"; return; fi
    say "$name: started (log: $log)"
    t=$(date +%s)
    if ! ( set -euxo pipefail; "$fn" ) >"$log" 2>&1; then
        say "$name: FAILED after $(( $(date +%s) - t ))s; last lines of $log:"
        tail -n 30 "$log" | sed 's/^/    /'
        exit 1
    fi
    echo "$(( $(date +%s) - t ))" >"$DONE/$name"
    say "$name: done in $(( $(date +%s) - t ))s"
}

APT_PACKAGES=(openmpi-bin libopenmpi-dev libhdf5-openmpi-dev libmumps-dev libscalapack-openmpi-dev
    libptscotch-dev libmetis-dev libopenblas-dev gfortran bison flex cmake pkg-config python3-dev
    python3-venv python3-pip make g++)

apt_packages() {
    local missing=()
    for p in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
    done
    [[ ${#missing[@]} -eq 0 ]] && { echo "all Debian packages present"; return; }
    local sudo=; [[ $(id -u) -ne 0 ]] && sudo="sudo -n"    # never wait for a password
    $sudo apt-get update
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends "${missing[@]}"
}

petsc_source() {
    rm -rf "$STACK/src" "$PETSC_DIR"
    mkdir -p "$STACK/src"
    python3 -m pip download --no-deps --no-binary petsc -d "$STACK/src" "petsc==$PETSC_VERSION"
    tar -xzf "$STACK/src/petsc-$PETSC_VERSION.tar.gz" -C "$STACK"
}

petsc_configure() {
    local L=/usr/lib/$(gcc -print-multiarch)    # x86_64-linux-gnu, aarch64-linux-gnu, ...
    cd "$PETSC_DIR"
    # Every external package comes from Debian: no --download-* (only PyPI and apt are reachable).
    python3 ./configure PETSC_ARCH=$PETSC_ARCH \
        --with-cc=mpicc --with-cxx=mpicxx --with-fc=mpif90 \
        --with-debugging=0 --with-shared-libraries=1 --with-c2html=0 --with-fortran-bindings=0 \
        --with-strict-petscerrorcode COPTFLAGS=-O2 CXXOPTFLAGS=-O2 FOPTFLAGS=-O2 \
        --with-blaslapack-lib="-L$L -lopenblas" \
        --with-hdf5-include=/usr/include/hdf5/openmpi --with-hdf5-lib="-L$L/hdf5/openmpi -lhdf5" \
        --with-scalapack-lib="-L$L -lscalapack-openmpi" \
        --with-mumps-include=/usr/include \
        --with-mumps-lib="-L$L -ldmumps -lzmumps -lsmumps -lcmumps -lmumps_common -lpord" \
        --with-metis-include=/usr/include --with-metis-lib="-L$L -lmetis" \
        --with-ptscotch-include=/usr/include/scotch \
        --with-ptscotch-lib="-L$L -lptesmumps -lptscotch -lptscotcherr -lscotch -lscotcherr" \
        --with-zlib=1 --with-x=0
}

petsc_build() {
    make -C "$PETSC_DIR" PETSC_DIR="$PETSC_DIR" PETSC_ARCH=$PETSC_ARCH MAKE_NP="$(nproc)" all
}

pip_() { "$VENV/bin/python" -m pip "$@"; }

venv_base() {
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    pip_ install -U pip setuptools wheel cython numpy pkgconfig
}

torch_wheel() {
    # The pinned version, whichever build the package index resolves (a CUDA build on a GPU
    # workstation is what its users want); say which, and whether CUDA is usable here.
    pip_ install "torch==$TORCH_VERSION"
    "$VENV/bin/python" -c "import torch; print('torch', torch.__version__, 'CUDA build',
        torch.version.cuda, 'CUDA usable', torch.cuda.is_available())"
}

mpi_petsc_bindings() {
    pip_ install --no-build-isolation --no-binary mpi4py "mpi4py==$MPI4PY_VERSION"
    pip_ install --no-build-isolation --no-binary petsc4py "petsc4py==$PETSC_VERSION"
}

h5py_parallel() {
    # HDF5_MPI and CC only: h5py rejects HDF5_DIR combined with include/lib dirs.
    HDF5_MPI=ON CC=mpicc pip_ install --no-build-isolation --no-binary h5py "h5py==$H5PY_VERSION"
}

firedrake_() {
    # With --no-build-isolation every sdist dependency needs its build backend already present.
    pip_ install libsupermesh firedrake-rtree pybind11 scikit-build-core petsctools \
        hatchling flit_core setuptools-scm poetry-core meson-python
    pip_ install --no-build-isolation "firedrake==$FIREDRAKE_VERSION" "pyadjoint-ad==$PYADJOINT_VERSION"
}

tools() {
    pip_ install pytest mpi-pytest tqdm matplotlib gmsh scipy "torch==$TORCH_VERSION"
    pip_ freeze >"$STACK/pip-freeze.txt"
}

vtk_() {
    # Firedrake's VTKFile (ParaView output of the demos) needs VTK, which Firedrake leaves out.
    pip_ install "vtk==$VTK_VERSION"
}

dev_tools() {
    pip_ install "sphinx==$SPHINX_VERSION" "myst-parser==$MYST_VERSION" "ruff==$RUFF_VERSION"
}

check() {
    "$VENV/bin/python" - <<'PY'
import firedrake, pyadjoint, torch, petsc4py, mpi4py, h5py
from firedrake.petsc import PETSc
print("petsc", ".".join(map(str, PETSc.Sys.getVersion())), "petsc4py", petsc4py.__version__,
      "mpi4py", mpi4py.__version__, "h5py", h5py.__version__, "mpi-h5py", h5py.get_config().mpi,
      "torch", torch.__version__, "(CUDA build", torch.version.cuda, "usable",
      torch.cuda.is_available(), ")", "pyadjoint", pyadjoint.__version__)
PY
    mpiexec -n 2 "$VENV/bin/python" -c \
        "import firedrake as fd; m = fd.UnitSquareMesh(4, 4); print(m.comm.rank, m.comm.size)"
}

step apt-packages apt_packages
step petsc-source petsc_source
step petsc-configure petsc_configure
step petsc-build petsc_build
step venv venv_base
step torch torch_wheel
step mpi4py-petsc4py mpi_petsc_bindings
step h5py h5py_parallel
step firedrake firedrake_
step tools tools
step vtk vtk_
step dev-tools dev_tools
step check check

# The editable install points at this clone; clones differ, so it is redone every time (seconds).
say "fem_moe (editable, $REPO): installing"
t=$(date +%s)
if ! pip_ install --no-deps --no-build-isolation -e "$REPO" >"$LOGS/fem_moe.log" 2>&1; then
    say "fem_moe: FAILED; see $LOGS/fem_moe.log"; tail -n 30 "$LOGS/fem_moe.log"; exit 1
fi
say "fem_moe: done in $(( $(date +%s) - t ))s"
say "stack ready: $STACK ($(du -sh "$STACK" 2>/dev/null | cut -f1))"
