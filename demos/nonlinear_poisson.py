# Nonlinear diffusion on a plate with holes, and one adjoint gradient
# ===================================================================
#
# The smallest end-to-end check of the stack fem_moe stands on: a Firedrake mesh read from
# ``meshes/``, a nonlinear PDE solved by PETSc SNES (serially or under ``mpiexec -n P``), and one
# gradient by pyadjoint through that solve, verified by a Taylor test. Run it as::
#
#     python demos/nonlinear_poisson.py
#     mpiexec -n 2 python demos/nonlinear_poisson.py -snes_monitor
#
# The problem: find u with u = 0 on the outer square and on the holes, and
#
#     -div((1 + u^2) grad u) = f   in the plate,
#
# for the source f = 10 exp(-((x - 0.3)^2 + (y - 0.8)^2) / 0.02). The functional is the mean
# square of u, J(f) = int u(f)^2 dx, and we want dJ/df.
import argparse
import os
import sys
import time

import firedrake as fd
from firedrake.adjoint import (Control, ReducedFunctional, continue_annotation,
                               pause_annotation, set_working_tape, taylor_test)

HERE = os.path.dirname(os.path.abspath(__file__))
parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--mesh", default=os.path.join(HERE, "..", "meshes", "plate_with_holes.msh"))
parser.add_argument("--degree", type=int, default=2)
args, _ = parser.parse_known_args()   # the rest are PETSc options (-snes_monitor, ...)

# The mesh and the space. The holes and the outer square carry the physical tags 2 and 1.
mesh = fd.Mesh(args.mesh)
V = fd.FunctionSpace(mesh, "CG", args.degree)
x, y = fd.SpatialCoordinate(mesh)
comm = mesh.comm

# The source f is the control: a Function on V, so that pyadjoint can differentiate w.r.t. it.
f = fd.Function(V, name="f").interpolate(10 * fd.exp(-((x - 0.3)**2 + (y - 0.8)**2) / 0.02))

# The nonlinear residual, and Newton's method with a direct solve. The options prefix makes every
# PETSc option available on the command line: ``-demo_snes_monitor``, ``-demo_ksp_view``.
u, v = fd.Function(V, name="u"), fd.TestFunction(V)
F = (1 + u**2) * fd.inner(fd.grad(u), fd.grad(v)) * fd.dx - f * v * fd.dx
bcs = fd.DirichletBC(V, 0, (1, 2))
parameters = {"snes_type": "newtonls", "snes_rtol": 1e-10, "snes_atol": 1e-12,
              "ksp_type": "preonly", "pc_type": "lu", "pc_factor_mat_solver_type": "mumps"}
solver = fd.NonlinearVariationalSolver(fd.NonlinearVariationalProblem(F, u, bcs),
                                       solver_parameters=parameters, options_prefix="demo_")

# Annotate the solve on a tape of its own, then stop: pyadjoint records only the converged state,
# and its backward through the solve is one linear adjoint solve (the implicit function theorem).
with set_working_tape() as tape:
    continue_annotation()
    t0 = time.perf_counter()
    solver.solve()
    t_solve = time.perf_counter() - t0
    J = fd.assemble(u**2 * fd.dx)
    Jhat = ReducedFunctional(J, Control(f))
    pause_annotation()

    t0 = time.perf_counter()
    dJdf = Jhat.derivative(apply_riesz=False)   # a Cofunction: dJ/d(dofs of f)
    t_adjoint = time.perf_counter() - t0

    # Taylor test: the first-order remainder |J(f + h df) - J(f) - h dJ.df| must fall as h^2.
    h = fd.Function(V).interpolate(fd.sin(3 * x) * fd.cos(2 * y))
    rate = taylor_test(Jhat, f, h)
    tape.clear_tape()

reason = solver.snes.getConvergedReason()
iterations = solver.snes.getIterationNumber()
norm = fd.norm(u)
grad_norm = dJdf.dat.norm
if comm.rank == 0:
    print(f"ranks {comm.size}: {V.dim()} dofs (P{args.degree}), {mesh.num_cells()} local cells "
          "on rank 0")
    print(f"  Newton: {iterations} iterations, reason {reason}, {t_solve:.2f} s")
    print(f"  J = int u^2 = {float(J):.10e}, ||u||_L2 = {norm:.10e}")
    print(f"  |dJ/df| (l2 of the dual vector) = {grad_norm:.10e}, adjoint {t_adjoint:.2f} s")
    print(f"  Taylor test: smallest convergence rate {rate:.4f} (expected 2)")
ok = reason > 0 and rate > 1.9
if not ok and comm.rank == 0:
    print("FAILED: Newton did not converge or the Taylor rates are below 1.9", file=sys.stderr)
sys.exit(0 if ok else 1)
