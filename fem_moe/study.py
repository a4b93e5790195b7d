"""Side-by-side studies: the same backbone trained as soft constraint, PI-HC and MoE, measured
against the classical solver, with one table, a JSON file, ParaView files and PNG figures.
What the demos are made of; collective over ``comm`` unless a function says otherwise."""
import copy
import json
import os
import statistics

import numpy as np
import torch
import firedrake as fd
from mpi4py import MPI

from . import report
from .arguments import provenance
from .data import ensure_dataset
from .errors import InputError, SolverDivergedError, TrainingStalledError
from .pdes import PDE
from .report import write_atomic
from .problem import from_owned_values, owned_values
from .train import Trainer

__all__ = ["run", "compare", "standard_models", "ensure_dataset", "print_table", "write_json",
           "write_readme", "write_fields", "plot_fields",
           "plot_losses", "transfer", "relative_l2_where", "pod_basis", "pod_check"]

# The paper's metric first: the relative L2 norm of the error over the domain.
COLUMNS = [("label", "model", "{:s}"), ("rel_l2_field", "rel. L2 (field)", "{:.3e}"),
           ("rel_l2", "rel. L2 (dofs)", "{:.3e}"),
           ("residual", "residual", "{:.3e}"), ("residual_interface", "res. interface", "{:.3e}"),
           ("residual_interior", "res. elsewhere", "{:.3e}"),
           ("step_time", "train s/step", "{:.3f}"),
           ("inference_time", "infer s/sample", "{:.4f}"),
           ("classical_time", "classical s/sample", "{:.4f}"),
           ("peak_mb", "peak MiB/rank", "{:.0f}"),
           ("failed", "failed", "{:d}")]


def standard_models(n_experts):
    """The demos' comparison, one backbone and budget for all: the soft constraint; the global
    layer (PI-HC) in least squares and Galerkin mode; the coupled mixture of K experts in both
    modes; and the paper's independent experts (least squares with its ridge on w)."""
    K = n_experts
    return [("soft", {"kind": "soft"}),
            ("PI-HC", {"kind": "pihc", "mode": "lstsq"}),
            ("PI-HC galerkin", {"kind": "pihc", "mode": "galerkin"}),
            (f"MoE K={K}", {"kind": "moe", "n_experts": K, "mode": "lstsq"}),
            (f"MoE K={K} galerkin", {"kind": "moe", "n_experts": K, "mode": "galerkin"}),
            (f"MoE K={K} independent", {"kind": "moe", "n_experts": K, "mode": "lstsq",
                                        "coupled": False, "ridge": "always", "norm": "euclidean"})]


def select(models, labels):
    """The (label, options) pairs of ``models`` whose label is in ``labels`` (a comma-separated
    string or a list; None: all), in ``models``' order; InputError naming an unknown label."""
    if labels is None:
        return list(models)
    wanted = [s.strip() for s in labels.split(",")] if isinstance(labels, str) else list(labels)
    known = [label for label, _ in models]
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise InputError(f"unknown model label(s) {unknown}; the labels are {known}")
    return [(label, options) for label, options in models if label in wanted]


def compare(config, models, out, comm=MPI.COMM_WORLD):
    """Train and evaluate each of ``models`` (a list of (label, {model options}) pairs, e.g.
    ("MoE K=4", {"kind": "moe", "n_experts": 4})) on ``config`` with everything else equal: the
    same backbone, data, steps and seed. Each trains into ``out/<label>``.

    Returns (rows, trainers): one dict per model with the evaluation on the test split
    (:meth:`fem_moe.train.Trainer.evaluate`) plus ``step_time`` (median seconds per training
    step, the first step and its kernel compilation left out), ``peak_mb`` (the largest peak
    resident memory over the ranks while this model trained and was evaluated), ``label``, and
    ``stalled`` (the first line of the error where training stopped because its steps kept being
    skipped, ``train.max_skipped_in_a_row``; the model is evaluated as it was, else None)."""
    rows, trainers = [], {}
    for label, options in models:
        cfg = copy.deepcopy(config)
        cfg["model"].update(options)
        cfg["train"]["out"] = os.path.join(out, _tag(label))
        report.reset_peak_rss()
        trainer = Trainer(cfg, comm)
        stalled = None
        try:
            trainer.fit()
        except TrainingStalledError as exc:    # evaluate what it reached
            stalled = str(exc).splitlines()[0]
            if comm.rank == 0:
                print(f"{label}: {stalled}", flush=True)
        try:
            row = trainer.evaluate("test")
        except SolverDivergedError as exc:
            # A reduced problem with no solution for any test input (Galerkin mode can have no
            # root where least squares always has a minimiser): a row that says so.
            n = len(trainer.splits["test"])
            row = {"kind": trainer.model.kind, "samples": n, "failed": n, "ranks": comm.size,
                   "dofs": trainer.problem.V.dim(), "error": str(exc),
                   **{key: float("nan")
                      for key in ("rel_l2", "rel_l2_max", "rel_l2_field", "rel_l2_field_max",
                                  "residual", "residual_interface", "residual_interior",
                                  "inference_time", "classical_time")},
                   "peak_rss_mb": comm.allgather(0.0)}
        row["stalled"] = stalled
        row["mode"] = trainer.config["model"]["mode"] if trainer.model.kind != "soft" else None
        times = [h["time"] for h in trainer.history[1:] if not h["skipped"]] or [float("nan")]
        row.update(label=label, step_time=statistics.median(times), peak_mb=max(row["peak_rss_mb"]),
                   skipped=sum(h["skipped"] for h in trainer.history))
        rows.append(row)
        trainers[label] = trainer
    return rows, trainers


def _tag(label):
    """A model's label as a file and field name ("MoE K=4" -> "MoE_K4")."""
    return label.replace(" ", "_").replace("=", "")


def print_table(rows, title=None, file=None):
    """The comparison table (:data:`COLUMNS`) on stdout. Call on one rank."""
    report.print_table(rows, COLUMNS, title, file)


def write_json(path, rows, **meta):
    """Rows and metadata to ``path`` atomically (rank 0 only), with how they were made: the
    command (on ``meta["ranks"]`` ranks), the machine, the date and the commit
    (:func:`fem_moe.arguments.provenance`). Returns the metadata written."""
    doc = {"meta": {**provenance(meta.get("ranks", 1)), **meta}, "rows": rows}
    write_atomic(path, lambda f: f.write(json.dumps(doc, indent=1, default=float).encode()))
    return doc["meta"]


def write_fields(trainers, out, sample=0, n_basis_shown=4, comm=MPI.COMM_WORLD):
    """For test sample ``sample``: the classical solution, each model's prediction and error,
    the MoE partition (DG0, expert per cell) and the first basis fields of each hard model, to
    ``out/fields.h5`` (a Firedrake CheckpointFile with the mesh: :func:`plot_fields` reads it on
    one rank) and to ParaView files ``out/fields.pvd`` and ``out/partition.pvd``. Returns the
    CheckpointFile's path."""
    first = next(iter(trainers.values()))
    V, idx = first.problem.V, first.splits["test"][sample:sample + 1]
    truth = from_owned_values(V, first.physical_target(idx)[0].cpu().numpy(), "classical")
    fields, partition, basis = [truth], None, []
    for label, tr in trainers.items():
        tag = _tag(label)
        tr.model.eval()
        with torch.no_grad():
            try:
                u = tr.predict(idx)[0].cpu().numpy()
            except SolverDivergedError:      # no solution for this input: shown as NaN
                u = np.full(len(owned_values(truth)), np.nan)
            phi = tr.model.basis(tr._tensors["inputs"][idx])[0, :n_basis_shown].cpu().numpy()
        fields.append(from_owned_values(V, u, f"prediction_{tag}"))
        fields.append(from_owned_values(V, u - owned_values(truth), f"error_{tag}"))
        if tr.model.kind != "soft":
            basis += [from_owned_values(V, p, f"basis{i}_{tag}") for i, p in enumerate(phi)]
        if tr.model.kind == "moe" and partition is None:
            partition = tr.model.constraint.partition.expert_indicator()
    if comm.rank == 0:
        os.makedirs(out, exist_ok=True)
    comm.barrier()
    fd.VTKFile(os.path.join(out, "fields.pvd"),
               comm=comm).write(*[g for f in fields for g in _parts(f)])
    if partition is not None:
        fd.VTKFile(os.path.join(out, "partition.pvd"), comm=comm).write(partition)
    path = os.path.join(out, "fields.h5")
    mesh = first.problem.mesh
    with fd.CheckpointFile(path, "w", comm=comm) as f:
        f.save_mesh(mesh)
        for fn in fields + basis + ([partition] if partition is not None else []):
            f.save_function(fn)
        f.set_attr("/", "fem_moe_fields", json.dumps([fn.name() for fn in fields]))
        f.set_attr("/", "fem_moe_basis", json.dumps([fn.name() for fn in basis]))
        f.set_attr("/", "fem_moe_partition", partition is not None)
        f.set_attr("/", "fem_moe_mesh", mesh.name)
        f.set_attr("/", "fem_moe_plot", json.dumps(first.dataset.pde.plot_field))
    return path


def _parts(f):
    """What VTK can take of ``f``: a mixed Function's subspaces as named Functions, and a vector
    of more than 3 components (e.g. one per time level) as one scalar Function per component."""
    subs = [f] if len(f.function_space()) == 1 else list(f.subfunctions)
    parts = []
    for i, sub in enumerate(subs):
        name = f.name() if len(subs) == 1 else f"{f.name()}_{i}"
        if sub.function_space().block_size <= 3:
            sub.rename(name)
            parts.append(sub)
            continue
        for c in range(sub.function_space().block_size):
            parts.append(_plottable(sub, component=c))
            parts[-1].rename(f"{name}_{c}")
    return parts


def _plottable(f, subspace=0, component=None):
    """What a plot shows of f (see PDE.plot_field): f, or a subspace of a mixed field (e.g. the
    velocity of a velocity-pressure pair: tripcolor draws a vector field's magnitude), or one
    component of it as a scalar field (e.g. the vorticity's last time level)."""
    f = f.subfunctions[subspace] if len(f.function_space()) > 1 else f
    if component is None:
        return f
    V = f.function_space()
    scalar = fd.Function(fd.FunctionSpace(V.mesh(), V.ufl_element().sub_elements[0]), name=f.name())
    scalar.dat.data[:] = f.dat.data_ro[:, component]
    return scalar


def _values(f):
    data = f.dat.data_ro
    return np.linalg.norm(data, axis=1) if data.ndim == 2 else data


def plot_fields(path, out):
    """PNG figures from :func:`write_fields`'s file: ``solutions.png`` (classical solution, then
    per model prediction and error), ``partition.png`` (the experts' subdomains), ``basis.png``
    (basis fields). Call on ONE rank (it reads the file on COMM_SELF)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from firedrake.pyplot import tripcolor
    with fd.CheckpointFile(path, "r", comm=MPI.COMM_SELF) as f:
        mesh = f.load_mesh(f.get_attr("/", "fem_moe_mesh"))
        names = json.loads(f.get_attr("/", "fem_moe_fields"))
        basis_names = json.loads(f.get_attr("/", "fem_moe_basis"))
        shown = json.loads(f.get_attr("/", "fem_moe_plot")) if f.has_attr("/", "fem_moe_plot") \
            else PDE.plot_field
        fields = {n: _plottable(f.load_function(mesh, n), *shown[:2]) for n in names}
        basis = [_plottable(f.load_function(mesh, n), *shown[:2]) for n in basis_names]
        has_partition = f.get_attr("/", "fem_moe_partition")
        partition = f.load_function(mesh, "expert") if has_partition else None
    models = [n[len("prediction_"):] for n in names if n.startswith("prediction_")]
    fig, axes = plt.subplots(len(models), 3, figsize=(11, 3.2 * len(models) + 0.5),
                             squeeze=False)
    truth = fields["classical"]
    lo, hi = _values(truth).min(), _values(truth).max()
    for i, m in enumerate(models):
        err = fields[f"error_{m}"]
        e = max(abs(_values(err)).max(), 1e-300)
        for ax, fn, title, kw in ((axes[i, 0], truth, "classical solver", dict(vmin=lo, vmax=hi)),
                                  (axes[i, 1], fields[f"prediction_{m}"], f"{m}: prediction",
                                   dict(vmin=lo, vmax=hi)),
                                  (axes[i, 2], err, f"{m}: error",
                                   dict(vmin=-e, vmax=e, cmap="RdBu_r"))):
            c = tripcolor(fn, axes=ax, **kw)
            fig.colorbar(c, ax=ax)
            ax.set_title(f"{title}{', ' + shown[2] if shown[2] else ''}", fontsize=9)
            ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "solutions.png"), dpi=110)
    plt.close(fig)
    if partition is not None:
        fig, ax = plt.subplots(figsize=(5, 4.5))
        c = tripcolor(partition, axes=ax, cmap="tab10")
        fig.colorbar(c, ax=ax, label="expert")
        ax.set_title("the experts' subdomains")
        fig.savefig(os.path.join(out, "partition.png"), dpi=110)
        plt.close(fig)
    if basis:
        cols = min(4, len(basis))
        rows = (len(basis) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False)
        for ax, fn in zip(axes.ravel(), basis):
            tripcolor(fn, axes=ax)
            ax.set_title(fn.name(), fontsize=8)
            ax.set_xticks([]), ax.set_yticks([])
        for ax in axes.ravel()[len(basis):]:
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(os.path.join(out, "basis.png"), dpi=100)
        plt.close(fig)


def plot_losses(trainers, path, key="loss"):
    """Training loss per step (and validation relative L2) for each model, to ``path`` (PNG).
    Call on one rank (the histories are the same on every rank)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for label, tr in trainers.items():
        steps = [h["step"] for h in tr.history]
        a.semilogy(steps, [h[key] for h in tr.history], label=label)
        v = [r for r in tr.validation if np.isfinite(r["rel_l2"])]
        b.semilogy([r["step"] for r in v], [r["rel_l2"] for r in v], "o-", label=label)
    a.set_xlabel("step"), a.set_ylabel("training loss"), a.legend()
    b.set_xlabel("step"), b.set_ylabel("validation relative L2"), b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(config, models, out, title, comm=MPI.COMM_WORLD, figures=True):
    """The whole study of a demo: the dataset (made if missing), every model trained and
    evaluated (:func:`compare`), the table printed and written to ``out/results.json``, and
    with ``figures`` the ParaView files and PNGs (``solutions.png``, ``partition.png``,
    ``basis.png``, ``losses.png``) in ``out``. Returns (rows, trainers)."""
    ensure_dataset(config, comm, progress=config["train"]["progress"])
    rows, trainers = compare(config, models, out, comm)
    if comm.rank == 0:
        print()
        print_table(rows, title)
        meta = write_json(os.path.join(out, "results.json"), rows, title=title, ranks=comm.size,
                          config=config)
    if figures:
        path = write_fields(trainers, out, comm=comm)
        if comm.rank == 0:
            plot_fields(path, out)
            plot_losses(trainers, os.path.join(out, "losses.png"))
        comm.barrier()
    if comm.rank == 0:
        write_readme(out, title, rows, meta)
    return rows, trainers


FIGURES = (("solutions.png", "the classical solution of a test input, each model's prediction "
                             "and its error"),
           ("partition.png", "the experts' subdomains"),
           ("basis.png", "the first basis fields of each hard-constrained model"),
           ("losses.png", "the training loss of each model"))


def write_readme(out, title, rows, meta):
    """``out/README.md``: what the folder holds, for a reader who did not run it -- the command
    that made it, the machine, the date and the commit (``meta``, as :func:`write_json` records
    them), the table (:data:`COLUMNS`, in Markdown) and the figures found in ``out``. Call on
    one rank."""
    def cell(row, key, fmt):
        value = row.get(key)
        return "-" if value is None else fmt.format(value)
    commit = meta.get("commit")
    lines = [f"# {title}", "",
             f"Made by `{meta.get('command', '?')}` on {meta.get('machine', '?')}, "
             f"{meta.get('date', '?')}" + (f", commit {commit}." if commit else "."), "",
             "Relative L2 errors against the classical solver on the held-out test inputs "
             "(means): *field* is the norm over the domain (the paper's metric), *dofs* the "
             "norm of the dof vectors. `results.json` holds these rows (with every input's "
             "error) and the config; each model's folder its training metrics and evaluation.",
             "", "| " + " | ".join(h for _, h, _ in COLUMNS) + " |",
             "|" + "|".join("---" if k == "label" else "---:" for k, _, _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(cell(r, k, f) for k, _, f in COLUMNS) + " |" for r in rows]
    shown = [(name, what) for name, what in FIGURES if os.path.exists(os.path.join(out, name))]
    if shown:
        lines += ["", "## Figures", ""]
        lines += [f"{what.capitalize()}:\n\n![{name}]({name})\n" for name, what in shown]
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")


def transfer(trainer, problem):
    """The trained model of ``trainer`` on another problem of its PDE family (another mesh, a
    longer time window): the same backbone (shared, not copied) and soft weights, a new
    constraint layer built on ``problem``. Collective over ``problem.comm``."""
    old = trainer.model
    model = trainer.solver(problem, old.backbone, old.kind)
    if old.kind == "soft":
        model.weights = old.weights
    return model


def relative_l2_where(trainer, dataset, region, batch_size=4):
    """Apply ``trainer``'s model to every sample of ``dataset`` (a :class:`fem_moe.data.Dataset`
    of the same PDE family, e.g. a longer window) and return the relative L2 error per sample
    over the dofs whose coordinates satisfy ``region`` (callable: [n, gdim] -> bool [n]), and
    the relative squared residual per sample over the whole dataset's mesh (NaN for samples
    whose constrained solve diverged). Collective."""
    from .layer import residual_loss
    from .losses import lifting_residual, relative_l2
    from .errors import SolverDivergedError
    model = transfer(trainer, dataset.problem)
    t = trainer._tensor
    keep = t(region(dataset.problem.dof_coordinates()).astype(np.float64))
    errors, residuals = [], []
    model.eval()
    for i in range(0, len(dataset), batch_size):
        sl = slice(i, i + batch_size)
        inputs, data = t(dataset.inputs[sl]), t(dataset.data[sl])
        try:
            with torch.no_grad():
                u = model(inputs, data)
        except SolverDivergedError:     # on every rank alike: these samples count as failed
            n = len(dataset.inputs[sl])
            errors.append(torch.full((n,), float("nan"), dtype=trainer.dtype))
            residuals.append(torch.full((n,), float("nan"), dtype=trainer.dtype))
            continue
        with torch.no_grad():
            lift = 0 if dataset.lifting is None else t(dataset.lifting[sl])
            target = t(dataset.targets[sl]) + lift
            errors.append(relative_l2(trainer.comm, (u + lift) * keep, target * keep,
                                      reduction="none"))
            norm = trainer.config["train"]["residual_norm"]
            r = residual_loss(dataset.problem, u, data, reduction="none", norm=norm)
            residuals.append(r / lifting_residual(dataset.problem, data, norm))
    return torch.cat(errors).cpu().numpy(), torch.cat(residuals).cpu().numpy()


def pod_basis(trainer, n_basis, split="train"):
    """The first ``n_basis`` POD modes of the constrained unknowns of ``split`` (the classical
    solutions, less the lifting): ``[n_basis, n_dofs]`` on this rank's owned dofs, orthonormal
    in the Euclidean inner product of all ranks' dofs. The best fixed basis of that size for
    the data in the least-squares sense. Collective (the snapshots' Gram matrix is summed over
    the ranks)."""
    # The dataset's own solutions: with train.fresh_inputs the trainer's training split holds
    # drawn inputs without solutions.
    T = np.asarray(trainer.dataset.targets)[trainer.splits[split]]
    G = trainer.comm.allreduce(T @ T.T)
    values, vectors = np.linalg.eigh(G)
    keep = np.argsort(values)[::-1][:n_basis]
    keep = keep[values[keep] > 1e-12 * values.max()]
    return (vectors[:, keep].T @ T) / np.sqrt(values[keep])[:, None]


def pod_check(trainer, n_basis, n_experts, out=None, split="test"):
    """How good can the constrained output be? The hard-constraint layers given the best fixed
    basis for the data (:func:`pod_basis` of the training split) instead of a trained
    backbone, on ``split``: rel. L2 of PI-HC and of the mixture of ``n_experts`` experts, and of
    the orthogonal projection of the truth on the same basis (an oracle: it uses the truth),
    and for a lifted PDE the lifting alone (for a window in time from an initial state held:
    persistence, the baseline a time-dependent model must beat).
    A model that is far from its row here is limited by its backbone, not by its constraint.
    Prints a table on rank 0, writes ``out/pod_basis.json``; returns the rows. Collective."""
    from .errors import SolverDivergedError
    from .layer import HardConstraint
    from .losses import global_sum, relative_l2
    from .moe import MoEHardConstraint
    comm, problem, t = trainer.comm, trainer.problem, trainer._tensor
    modes = pod_basis(trainer, n_basis)
    idx = trainer.splits[split]
    data, target = trainer._tensors["data"][idx], trainer.physical_target(idx)
    lift = 0 if trainer._lift is None else trainer._lift[idx]
    basis = t(modes)[None].expand(len(idx), -1, -1).contiguous()
    coefficients = global_sum((target - lift) @ basis[0].T, comm)
    oracle = relative_l2(comm, coefficients @ basis[0] + lift, target, reduction="none")
    rows = [dict(label="projection (oracle)", rel_l2=float(oracle.mean()), failed=0)]
    if trainer._lift is not None:       # the unknown = 0; over a time window: persistence
        held = relative_l2(comm, lift.expand_as(target), target, reduction="none")
        persistence = dict(label="lifting alone (persistence)", rel_l2=float(held.mean()),
                           failed=0)
        rows.insert(0, persistence)
    layers = [("PI-HC", HardConstraint(problem, len(modes))),
              (f"MoE K={n_experts}", MoEHardConstraint(problem, len(modes), n_experts=n_experts))]
    for label, layer in layers:
        try:
            with torch.no_grad():
                err = relative_l2(comm, layer(basis, data) + lift, target, reduction="none")
            rows.append(dict(label=label, rel_l2=float(err.mean()), failed=0))
        except SolverDivergedError:        # raised on every rank alike
            rows.append(dict(label=label, rel_l2=float("nan"), failed=len(idx)))
    if comm.rank == 0:
        print()
        report.print_table(rows,
                           [("label", "with the POD basis", "{:s}"),
                            ("rel_l2", "rel. L2", "{:.3e}"), ("failed", "failed", "{:d}")],
                           f"{len(modes)} POD modes of the training solutions, on the {split} "
                           "inputs")
        if out is not None:
            write_json(os.path.join(out, "pod_basis.json"), rows, n_basis=len(modes), split=split,
                       ranks=comm.size)
    return rows
