"""Physics-informed training of a neural PDE solver under mpirun: the loop, its checkpoints and
metrics, and evaluation against the classical solver.

``Trainer(config)`` (a config file, a dict over :data:`fem_moe.config.DEFAULTS`, or a loaded
config) is collective over ``comm``: every rank builds the same model, loads its share of the
dataset and takes part in every step. ``trainer.fit()`` trains, ``trainer.evaluate()`` measures.
``python -m fem_moe train|evaluate|generate CONFIG`` does the same from the command line.

**Losses** (``train.loss``), all on the *physical* field (the constrained unknown plus the PDE's
lifting, if it has one):

* ``"physics"`` (default): the squared global residual norm ||P R(u; m)||^2 + ||B(u - g)||^2 of
  the output (:func:`fem_moe.residual_loss`: assembled on the whole mesh, interface rows between
  experts included; the boundary misfit is zero for the hard kinds, which impose it), divided by
  the same norm at the lifting of the boundary data (u = g), so that it is 1 for the trivial
  prediction whatever the problem's scale. No solution data is used.
* ``"supervised"``: relative L2 of the dof vector against the classical solution;
* ``"mixed"``: ``physics_weight * physics + supervised_weight * supervised``.

**Determinism.** The initial weights come from ``train.seed`` (then broadcast from rank 0), the
batches of step s from a permutation seeded by (seed, epoch of s); nothing else is random. So a
run resumed from a checkpoint takes the same steps as one that was never interrupted.

**A diverging solve** (an expert's SNES that fails, raised on every rank as
SolverDivergedError naming expert, sample and reason) is recorded in the metrics with the step,
then ``train.on_diverge = "skip"`` drops that step's update and goes on, ``"stop"`` writes a
checkpoint and raises. Skipping stops too (checkpoint, then TrainingStalledError, a
SolverDivergedError) once ``train.max_skipped_in_a_row`` steps in a row were skipped: the
weights no longer change. A non-finite loss always stops.
"""
import csv
import io
import json
import math
import os
import re
import time
import warnings

import numpy as np
import torch
from mpi4py import MPI

from . import bridge, checkpoint
from .backbones import DeepONetBasis, ParametricFNOBasis
from .config import DEFAULTS, FREE, as_config
from .data import Dataset, sample_arrays
from .diagnostics import WarningSummary
from .errors import (FemMoeError, InputError, RankDeficientBasisWarning, SolverDivergedError,
                     TrainingStalledError, raise_on_all_ranks)
from .expert import dirichlet_dofs
from .layer import residual_loss, residual_rows
from .losses import lifting_residual, relative_l2, relative_l2_field
from .model import NeuralSolver
from .partition import mesh_periods
from .pdes import config_section, lookup
from .report import peak_rss_mb, write_atomic

__all__ = ["Trainer", "build_backbone", "layer_options", "solver_from_config"]

CHECKPOINT = "checkpoint.pt"
# What a checkpoint must agree on with the config that resumes it.
RESUME_KEYS = (("pde",), ("model",), ("data", "n_train"), ("data", "seed"), ("train", "loss"),
               ("train", "residual_norm"), ("train", "batch_size"), ("train", "seed"),
               ("train", "dtype"))


def build_backbone(model, problem, pde, n_inputs, comm=MPI.COMM_WORLD):
    """The backbone a config's ``model`` section names (``backbone``: deeponet | fno, and its
    sizes) for ``problem``'s mesh — its bounding box over every rank and its periods — and
    ``pde``'s inputs (``n_inputs`` numbers per input; the fields an FNO sees, where the PDE has
    them). Collective over ``comm``."""
    X = problem.mesh.coordinates.dat.data_ro
    lo = np.min(comm.allgather(X.min(axis=0)), axis=0)
    hi = np.max(comm.allgather(X.max(axis=0)), axis=0)
    periods = mesh_periods(problem.mesh)
    if model["backbone"] == "fno":
        if 2 * model["modes"] > model["grid"] + 1:
            raise InputError(f"model.modes = {model['modes']} needs model.grid >= "
                             f"{2 * model['modes'] - 1}")
        # Where the inputs are the coefficients of fields, the FNO sees those fields.
        points = ParametricFNOBasis.grid_points(lo, hi, model["grid"], periods).numpy()
        fields = pde.input_fields(points)
        if fields is not None:
            fields = np.asarray(fields).reshape(*np.shape(fields)[:2], *[model["grid"]] * len(lo))
        return ParametricFNOBasis(n_inputs, model["n_basis"], lo, hi, grid=model["grid"],
                                  modes=model["modes"], width=model["width"], layers=model["depth"],
                                  n_components=problem.n_components, periods=periods,
                                  input_fields=fields, products=model["fno_products"])
    return DeepONetBasis(n_inputs, model["n_basis"], problem.mesh.geometric_dimension,
                         n_components=problem.n_components, latent=model["latent"],
                         width=model["width"], depth=model["depth"],
                         shift=torch.tensor((lo + hi) / 2),
                         scale=torch.tensor(np.maximum((hi - lo) / 2, 1e-12)),
                         periods=torch.tensor(periods), fourier_features=model["fourier_features"],
                         fourier_scale=model["fourier_scale"])


def layer_options(model, kind):
    """The constraint layer's options that a config's ``model`` section gives a model of
    ``kind`` (a mixture's "dual_blocks" is the whole mesh's "dual" for the global layer)."""
    if kind == "soft":
        return {}
    norm = None if model["norm"] == "auto" else model["norm"]
    if kind == "pihc" and norm == "dual_blocks":
        norm = "dual"
    options = {"ridge": model["ridge_factor"] or None, "ridge_always": model["ridge"] == "always",
               "norm": norm, "warm_start": model["warm_start"],
               "warm_start_memory": model["warm_start_memory"] * 2 ** 20,
               "training_rtol": model["training_rtol"] or None}
    if kind == "moe":
        options.update(coupled=model["coupled"], coupling_parameters=model["coupling_parameters"],
                       partition=None if model["partition"] == "auto" else model["partition"])
    return options


def solver_from_config(config, problem, backbone, kind=None, backbone_ranks=None, device=None,
                       **overrides):
    """The NeuralSolver that ``config`` describes (``kind``: another than its ``model.kind``)
    on ``problem`` around ``backbone``, in the config's ``train.dtype`` on ``device``;
    ``overrides`` replace layer options. Collective over ``problem``'s communicator."""
    m = config["model"]
    kind = kind or m["kind"]
    model = NeuralSolver(problem, backbone, kind=kind, n_basis=m["n_basis"],
                         n_experts=m["n_experts"], mode=m["mode"],
                         partitioner_type=m["partitioner"], backbone_ranks=backbone_ranks,
                         **{**layer_options(m, kind), **overrides})
    return model.to(device=device, dtype=getattr(torch, config["train"]["dtype"]))


def _resume_differences(saved, config):
    """[(name, saved value, config's value)] for the RESUME_KEYS where a checkpoint's config and
    ``config`` disagree, option by option. An option the checkpoint's config lacks (made
    before the option existed) counts as its default, the behaviour of the version that wrote
    it; where a default changed since, the option is named. The PDE's options are compared as
    the PDE resolves them (an option left out is its default)."""
    saved, config = ({**c, "pde": _resolved_pde(c.get("pde", DEFAULTS["pde"]))}
                     for c in (saved, config))
    out = []
    for keys in RESUME_KEYS:
        old, new, default = saved, config, DEFAULTS
        for k in keys:
            old, new, default = old.get(k, default[k]), new[k], default[k]
        if isinstance(default, dict) and keys not in FREE:      # a section: option by option
            for name, value in new.items():
                before = old.get(name, default.get(name))
                if before != value:
                    out.append((".".join(keys + (name,)), before, value))
        elif old != new:
            out.append((".".join(keys), old, new))
    return out


def _resolved_pde(section):
    """A config's pde section with every option of the PDE, as it resolves them (unchanged if
    the PDE cannot be made)."""
    try:
        return {"name": section["name"],
                "options": lookup(section["name"])(**section["options"]).opts}
    except (InputError, KeyError, TypeError):
        return section


def _finite_mean(values):
    """The mean of the finite entries of a tensor (NaN if there are none)."""
    values = values[torch.isfinite(values)]
    return float(values.mean()) if len(values) else float("nan")


def _spread(key, values, ok):
    """``key`` (mean), ``key_max``, ``key_std`` over the samples ``ok`` of ``values`` (a
    tensor [n]), and ``key_samples`` (all n, NaN where a solve diverged)."""
    v = values[ok]
    return {key: float(v.mean()), f"{key}_max": float(v.max()),
            f"{key}_std": float(v.std(unbiased=False)) if len(v) > 1 else 0.0,
            f"{key}_samples": [float(x) for x in values.cpu()]}


class Trainer:
    """Train and evaluate one model on one dataset. Collective over ``comm`` (all methods).

    Attributes: ``config``, ``dataset`` (:class:`fem_moe.data.Dataset`), ``problem``, ``model``
    (:class:`fem_moe.model.NeuralSolver`), ``optimizer`` (Adam), ``scheduler``, ``step`` (steps
    taken), ``history`` (per-step dicts), ``validation`` (per-validation dicts), ``diverged``
    (recorded solver failures), ``device``. ``pde``: the PDE instance to train on (a PDE of
    your own made in your script) instead of the one the config names; it must be the one the
    dataset was made with.
    """

    def __init__(self, config=None, comm=MPI.COMM_WORLD, pde=None):
        self.comm = comm
        err = None
        try:
            self.config = cfg = as_config(config)
            if pde is not None:
                cfg["pde"] = config_section(pde)
        except FemMoeError as e:
            err = e
        raise_on_all_ranks(comm, err)       # every rank reads the same file; make sure anyway
        m, t, d = cfg["model"], cfg["train"], cfg["data"]
        self.dataset = ds = Dataset(d["path"], comm,
                                    expect=(cfg["pde"]["name"], cfg["pde"]["options"]),
                                    problem_kwargs={"solver_parameters": m["solver_parameters"]},
                                    pde=pde)
        need = d["n_train"] + d["n_val"] + d["n_test"]
        raise_on_all_ranks(comm, None if need <= len(ds) else
                           f"{d['path']}: the config asks for {d['n_train']} + {d['n_val']} + "
                           f"{d['n_test']} samples but the dataset holds {len(ds)}")
        raise_on_all_ranks(comm, None if t["batch_size"] <= d["n_train"] else
                           f"train.batch_size = {t['batch_size']} exceeds data.n_train = "
                           f"{d['n_train']}")
        raise_on_all_ranks(comm, None if not t["fresh_inputs"] or t["loss"] == "physics" else
                           f"train.fresh_inputs needs train.loss = 'physics' (fresh inputs have no "
                           f"solutions), got {t['loss']!r}")
        self.splits = {"train": np.arange(d["n_train"]),
                       "val": d["n_train"] + np.arange(d["n_val"]),
                       "test": d["n_train"] + d["n_val"] + np.arange(d["n_test"])}
        self.problem = problem = ds.problem
        ranks = m["backbone_ranks"]
        self.backbone_ranks = bridge.BackboneRanks(comm, None if ranks == "auto" else ranks)
        self.device = self.backbone_ranks.device
        self.dtype = getattr(torch, t["dtype"])
        torch.manual_seed(t["seed"])
        self.model = self.solver(problem, self._backbone(), m["kind"])
        # model.global_steps: the mixture's basis first trained through the global layer (the
        # same backbone object, so the same parameters and optimiser).
        self._global = None
        if m["kind"] == "moe" and m["global_steps"]:
            self._global = self.solver(problem, self.model.backbone, "pihc")
        if m["backbone_from"]:
            self._start_backbone_from(m["backbone_from"])
        self.backbone_ranks.broadcast_parameters(self.model)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=t["lr"])
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        # Per sample: the physical field's offset and the residual at the Dirichlet lifting.
        _, g = dirichlet_dofs(problem)
        self._g = g
        self._tensors = {k: self._tensor(v) for k, v in (("inputs", ds.inputs), ("data", ds.data),
                                                          ("targets", ds.targets))}
        self._lift = None if ds.lifting is None else self._tensor(ds.lifting)
        self._residual_scale = self._lifting_scale(self._tensors["data"])
        self.step, self.history, self.validation, self.diverged = 0, [], [], []
        # Rank-deficient bases are common while a backbone is young: one summary per fit and
        # per evaluation instead of a warning per expert, input and step.
        self._rank_deficiency = WarningSummary(RankDeficientBasisWarning)
        self.out = t["out"]
        if comm.rank == 0:
            os.makedirs(self.out, exist_ok=True)
        comm.barrier()
        if t["resume"] and os.path.isfile(self.checkpoint_path):
            self.load_checkpoint(self.checkpoint_path)

    # ------------------------------------------------------------------ setup helpers
    def _tensor(self, a):
        return torch.tensor(np.ascontiguousarray(a), dtype=self.dtype, device=self.device)

    def _served(self):
        """The backbone ranks where some rank is served by another, else None (every rank
        evaluates its own points)."""
        return None if self.backbone_ranks.everywhere else self.backbone_ranks

    def solver(self, problem, backbone, kind):
        """A NeuralSolver of ``kind`` on ``problem`` around ``backbone`` (shared, not copied),
        with this config's layer options, on the trainer's device and dtype: the trained model,
        the global layer of ``model.global_steps``, the trained model on another mesh
        (:func:`fem_moe.study.transfer`). Collective over ``problem``'s communicator."""
        return solver_from_config(self.config, problem, backbone, kind, self._served(),
                                  self.device)

    def _backbone(self):
        return build_backbone(self.config["model"], self.problem, self.dataset.pde,
                              self.dataset.inputs.shape[1], self.comm)

    def _start_backbone_from(self, path):
        """The backbone's weights from the checkpoint ``path`` of another run with the same
        backbone settings (its model kind may differ: a mixture trained on from a PI-HC
        run's basis). The optimiser starts afresh. Collective."""
        err = None
        try:
            state = checkpoint.load(path, map_location=self.device)["model"]
            prefix = "backbone."
            self.model.backbone.load_state_dict(
                {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        except (checkpoint.CheckpointError, RuntimeError, KeyError) as e:
            err = f"model.backbone_from: cannot start the backbone from {path}: {e}"
        raise_on_all_ranks(self.comm, err)

    def _lr_factor(self, step):
        """The schedule's factor at ``step`` (0-based), ramped up linearly over the warm-up."""
        t = self.config["train"]
        warmup = min(1.0, (step + 1) / t["warmup_steps"]) if t["warmup_steps"] else 1.0
        if t["schedule"] == "cosine":
            floor = t["min_lr"] / t["lr"]
            cosine = 0.5 * (1 + math.cos(math.pi * min(step, t["steps"]) / t["steps"]))
            return warmup * (floor + (1 - floor) * cosine)
        if t["schedule"] == "step":
            return warmup * t["gamma"] ** (step // t["step_size"])
        return warmup

    @property
    def checkpoint_path(self):
        return os.path.join(self.out, CHECKPOINT)

    def batch(self, step):
        """Dataset indices of the training batch of ``step`` (the same on every rank). With
        ``train.fresh_inputs`` the batch is drawn anew from the PDE's input distribution (its
        seed from ``train.seed`` and ``step``, so a resumed run draws what the uninterrupted one
        would) and written over the first ``batch_size`` training samples, whose indices are
        returned: training then sees a new sample every time, and no solution is needed."""
        t, n = self.config["train"], len(self.splits["train"])
        if t["fresh_inputs"]:
            return self._draw_fresh(step)
        per_epoch = n // t["batch_size"]
        epoch, i = divmod(step, per_epoch)
        order = np.random.default_rng([t["seed"], epoch]).permutation(n)
        return self.splits["train"][order[i * t["batch_size"]:(i + 1) * t["batch_size"]]]

    def _lifting_scale(self, data):
        """Per sample of ``data``: the lifting's physics loss, what relative residuals are
        measured against (floored above 0)."""
        base = lifting_residual(self.problem, data, norm=self.config["train"]["residual_norm"])
        return base.clamp_min(torch.finfo(base.dtype).tiny)

    def _draw_fresh(self, step):
        t, pde = self.config["train"], self.dataset.pde
        idx = self.splits["train"][:t["batch_size"]]
        params = pde.sample(np.random.default_rng([t["seed"], 1, step]), len(idx))
        rows, lifts = zip(*(sample_arrays(pde, self.problem, pde.data(self.problem, p))
                            for p in params))
        T = self._tensors
        T["inputs"][idx] = self._tensor(pde.inputs(params))
        T["data"][idx] = self._tensor(np.array(rows))
        T["targets"][idx] = float("nan")        # no solutions: the physics loss needs none
        if self._lift is not None:
            self._lift[idx] = self._tensor(np.array(lifts))
        self._residual_scale[idx] = self._lifting_scale(T["data"][idx])
        return idx

    # ------------------------------------------------------------------ model and losses
    def predict(self, idx, model=None):
        """The model's physical fields for dataset samples ``idx``: ``[len(idx), n_dofs]``
        (this rank's owned dofs); ``model``: another with the same backbone (default the
        trained one). Rank-deficient bases are summarised in one warning. Collective."""
        with self._rank_deficiency.gathering("predict", self.step, idx):
            u = self._physical(self._unknown(idx, model), idx)
        self._rank_deficiency.issue(self.comm, self._subject())
        return u

    def _unknown(self, idx, model=None):
        """The model's output for samples ``idx``: the unknown the physical field is made of."""
        T = self._tensors
        return (self.model if model is None else model)(T["inputs"][idx], T["data"][idx])

    def _physical(self, unknown, idx):
        return unknown if self._lift is None else unknown + self._lift[idx]

    def _training_model(self):
        """The model this step trains: the global layer on the mixture's basis during
        ``model.global_steps``, else the model."""
        if self._global is not None and self.step < self.config["model"]["global_steps"]:
            return self._global
        return self.model

    def physical_target(self, idx):
        t = self._tensors["targets"][idx]
        return t if self._lift is None else t + self._lift[idx]

    def physics_loss(self, u, idx, reduction="mean", unknown=None):
        """Squared global residual of the constrained unknown, relative to the lifting's, for
        physical fields ``u``; ``unknown``: the model's output they were made of, if at hand
        (taken as it stands: a PI-HC layer's training output then brings its residual and
        Jacobian, :mod:`fem_moe.points`, which ``u`` minus the lifting, rounded, would not)."""
        if unknown is None:
            unknown = u if self._lift is None else u - self._lift[idx]
        vals = residual_loss(self.problem, unknown, self._tensors["data"][idx], reduction="none",
                             norm=self.config["train"]["residual_norm"])
        vals = vals / self._residual_scale[idx]
        return vals.mean() if reduction == "mean" else vals

    def losses(self, u, idx, unknown=None):
        """(total, {"physics": float, "supervised": float}) for predictions u of samples idx
        (``unknown``: as in :meth:`physics_loss`)."""
        t = self.config["train"]
        parts, total = {}, 0.0
        if t["loss"] in ("physics", "mixed"):
            phys = self.physics_loss(u, idx, unknown=unknown)
            parts["physics"] = phys.item()
            total = total + (t["physics_weight"] if t["loss"] == "mixed" else 1.0) * phys
        if t["loss"] in ("supervised", "mixed"):
            sup = relative_l2(self.comm, u, self.physical_target(idx))
            parts["supervised"] = sup.item()
            total = total + (t["supervised_weight"] if t["loss"] == "mixed" else 1.0) * sup
        return total, parts

    # ------------------------------------------------------------------ training
    def _subject(self):
        """The model, as the warnings' summaries name it."""
        m = self.config["model"]
        what = {"soft": "soft-constrained model", "pihc": f"PI-HC ({m['mode']})",
                "moe": f"MoE K={m['n_experts']} ({m['mode']}, "
                       f"{'coupled' if m['coupled'] else 'independent'})"}[m["kind"]]
        return f"{what} in {self.out}"

    def _record_divergence(self, error, batch, step, phase):
        """Append a SolverDivergedError of ``batch`` (dataset indices) to ``self.diverged``;
        returns the dataset index of the diverged sample (None if unknown)."""
        sample = None if error.sample is None else int(batch[error.sample])
        self.diverged.append({"step": step, "phase": phase, "expert": error.expert,
                              "sample": sample,
                              "reason": error.reason, "message": str(error).splitlines()[0]})
        return sample

    def train_step(self):
        """One optimisation step on batch ``self.batch(self.step)``; returns its record."""
        idx = self.batch(self.step)
        t0 = time.perf_counter()
        record = {"step": self.step + 1, "lr": self.optimizer.param_groups[0]["lr"]}
        model = self._training_model()
        model.train()
        self.optimizer.zero_grad()
        try:
            with self._rank_deficiency.gathering("train", self.step + 1, idx) as found:
                unknown = self._unknown(idx, model)
            record["rank_deficient"] = found["count"]
            loss, parts = self.losses(self._physical(unknown, idx), idx, unknown)
            if not math.isfinite(loss.item()):
                raise FemMoeError(f"training diverged: the loss is {loss.item()} at step "
                                  f"{self.step + 1} (batch {idx.tolist()})")
            loss.backward()
        except SolverDivergedError as e:
            sample = self._record_divergence(e, idx, self.step + 1, "train")
            record.update(loss=float("nan"), skipped=True, time=time.perf_counter() - t0)
            self.step += 1
            with warnings.catch_warnings():     # the schedule follows the step count, taken or not
                warnings.filterwarnings("ignore",
                                        re.escape("Detected call of `lr_scheduler.step()`"))
                self.scheduler.step()
            self.history.append(record)
            t = self.config["train"]
            if t["on_diverge"] == "stop":
                self.save_checkpoint()
                raise SolverDivergedError(
                    f"step {record['step']}: a constrained solve diverged (expert {e.expert}, "
                    f"dataset sample {sample}, {e.reason}); train.on_diverge = 'stop'. "
                    f"Checkpoint written to {self.checkpoint_path}.\n{e}",
                    expert=e.expert, sample=sample, reason=e.reason) from None
            in_a_row = self._skipped_in_a_row()
            if t["max_skipped_in_a_row"] and in_a_row >= t["max_skipped_in_a_row"]:
                # Every rank saw the same failures (they are raised on all ranks), so every
                # rank stops here alike. A skipped step leaves the weights as they were: a basis
                # whose reduced problems have no solution stays so, and training is over.
                self.save_checkpoint()
                raise TrainingStalledError(
                    f"training stalled: the last {in_a_row} steps ({record['step'] - in_a_row + 1}"
                    f"-{record['step']}) were all skipped, each because a constrained solve "
                    f"diverged, so the weights have not changed since step "
                    f"{record['step'] - in_a_row} (train.max_skipped_in_a_row = "
                    f"{t['max_skipped_in_a_row']}). In Galerkin mode the reduced problem may have "
                    f"no root for this basis (least squares always has a minimiser); a smaller "
                    f"train.lr may keep the basis where the solves converge. Checkpoint written "
                    f"to {self.checkpoint_path}. The last failure:\n{e}",
                    expert=e.expert, sample=sample, reason=e.reason) from None
            return record
        self.backbone_ranks.allreduce_gradients(self.model)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        record.update(loss=loss.item(), **parts, skipped=False, time=time.perf_counter() - t0)
        self.history.append(record)
        return record

    def _skipped_in_a_row(self):
        """How many of the last steps taken were skipped, counting back to the last taken one."""
        n = 0
        for record in reversed(self.history):
            if not record["skipped"]:
                break
            n += 1
        return n

    def fit(self, steps=None):
        """Train until ``steps`` (default ``train.steps``) steps have been taken in total,
        validating every ``val_every`` steps and at the end, checkpointing every
        ``checkpoint_every`` steps and at the end. Returns the history."""
        from tqdm import tqdm
        t = self.config["train"]
        steps = t["steps"] if steps is None else steps
        bar = tqdm(total=steps, initial=self.step, desc=f"train {self.model.kind}",
                   disable=not t["progress"] or self.comm.rank != 0, dynamic_ncols=True)
        with bar:
            while self.step < steps:
                rec = self.train_step()
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.3e}")
                if self.step % t["val_every"] == 0 or self.step == steps:
                    self.validate()
                if self.step % t["checkpoint_every"] == 0 or self.step == steps:
                    self.save_checkpoint()
        self._rank_deficiency.issue(self.comm, self._subject())
        return self.history

    # ------------------------------------------------------------------ evaluation
    def _predict_split(self, split, batch_size=None):
        """Predictions for ``split``, ``[n, n_dofs]``. A batch whose constrained solve diverges
        is NaN (and recorded in ``self.diverged``) under ``on_diverge = "skip"``; raises under
        "stop". The same rows are NaN on every rank."""
        idx = self.splits[split]
        bs = batch_size or self.config["train"]["batch_size"]
        self.model.eval()
        parts = []
        for i in range(0, len(idx), bs):
            batch = idx[i:i + bs]
            try:
                with torch.no_grad(), self._rank_deficiency.gathering(split, self.step, batch):
                    parts.append(self._physical(self._unknown(batch), batch))
            except SolverDivergedError as e:
                if self.config["train"]["on_diverge"] == "stop":
                    raise
                self._record_divergence(e, batch, self.step, split)
                parts.append(torch.full((len(batch), self.problem.n_dofs), float("nan"),
                                        dtype=self.dtype, device=self.device))
        return torch.cat(parts)

    def _measure(self, u, idx):
        """(relative L2 of the dof vectors [n], relative L2 norm over the domain [n], relative
        squared residual [n]) of predictions u of samples idx; NaN for the samples whose solve
        diverged."""
        ok = torch.isfinite(u).all(dim=1)
        rel = torch.full((len(idx),), float("nan"), dtype=u.dtype, device=u.device)
        field, res = rel.clone(), rel.clone()
        if ok.any():
            good = idx[ok.cpu().numpy()]
            target = self.physical_target(good)
            rel[ok] = relative_l2(self.comm, u[ok], target, reduction="none")
            field[ok] = relative_l2_field(self.problem, u[ok], target).to(u.dtype)
            res[ok] = self.physics_loss(u[ok], good, reduction="none")
        return rel, field, res

    def validate(self, split="val"):
        """Relative L2 and relative residual on ``split`` (means over the samples whose solves
        converged; ``failed`` counts the others); appended to ``self.validation``."""
        if not len(self.splits[split]):
            return None
        idx = self.splits[split]
        rel, field, res = self._measure(self._predict_split(split), idx)
        rec = {"step": self.step, "rel_l2": _finite_mean(rel), "rel_l2_field": _finite_mean(field),
               "residual": _finite_mean(res),
               "failed": int((~torch.isfinite(rel)).sum())}
        self.validation.append(rec)
        return rec

    def evaluate(self, split="test", write=True):
        """Measure the model on ``split`` against the classical solver. Returns (and, with
        ``write``, saves to ``out/evaluation_<split>.json``) a dict: ``rel_l2`` (the relative
        L2 error of the dof vectors, as the paper's grids measure it: mean, max, standard
        deviation over the samples, and per sample: ``rel_l2_samples``), ``rel_l2_field`` (the
        same four of the relative L2 norm over the domain, :func:`fem_moe.losses.relative_l2_field`:
        what to read on a graded or locally refined mesh, where the dof vectors' norm weighs the
        small cells' dofs as much as the large ones'),
        ``residual`` (mean relative squared global residual, as the physics loss),
        ``residual_interface`` / ``residual_interior`` (RMS residual rows at rows mixing two
        experts' fields and elsewhere, relative to the lifting's RMS residual; MoE only),
        ``inference_time`` (seconds per sample, batched, slowest rank), ``classical_time``
        (the classical solve's seconds per sample when the dataset was made), ``peak_rss_mb``
        (per rank), ``failed`` (samples whose constrained solve diverged, under
        ``on_diverge = "skip"``: left out of the means, listed in ``self.diverged``)."""
        idx = self.splits[split]
        if not len(idx):
            raise InputError(f"the {split} split is empty (data.n_{split} = 0)")
        self.comm.barrier()
        t0 = time.perf_counter()
        u = self._predict_split(split)
        seconds = self.comm.allreduce(time.perf_counter() - t0, op=MPI.MAX)
        self._rank_deficiency.issue(self.comm, self._subject())
        rel, field, res = self._measure(u, idx)
        ok = torch.isfinite(rel)
        if not ok.any():
            raise SolverDivergedError(f"every {split} sample's constrained solve diverged: "
                                      f"{self.diverged[-1]['message']}")
        out = {"split": split, "samples": len(idx), "failed": int((~ok).sum()),
               "kind": self.model.kind,
               "n_experts": getattr(self.model.constraint, "n_experts",
                                    1 if self.model.kind == "pihc" else 0),
               "ranks": self.comm.size, "dofs": self.problem.V.dim(), "step": self.step,
               **_spread("rel_l2", rel, ok), **_spread("rel_l2_field", field, ok),
               "residual": float(res[ok].mean()),
               "inference_time": seconds / len(idx),
               "classical_time": float(np.mean(self.dataset.solve_time[idx])),
               "peak_rss_mb": self.comm.allgather(peak_rss_mb())}
        if self.model.kind == "moe":
            good = ok.cpu().numpy()
            out.update(self._interface_residuals(u[ok], idx[good]))
        if write and self.comm.rank == 0:
            write_atomic(os.path.join(self.out, f"evaluation_{split}.json"),
                         lambda f: f.write(json.dumps(out, indent=1).encode()))
        return out

    def _interface_residuals(self, u, idx):
        unknown = u if self._lift is None else u - self._lift[idx]
        R = residual_rows(self.problem, unknown, self._tensors["data"][idx])
        R0 = residual_rows(self.problem, self._tensor(np.broadcast_to(self._g, R.shape)),
                           self._tensors["data"][idx])
        mask = self.model.constraint.interface_mask()
        sums = self.comm.allreduce(np.array([(R[:, mask] ** 2).sum(), mask.sum() * len(idx),
                                             (R[:, ~mask] ** 2).sum(), (~mask).sum() * len(idx),
                                             (R0 ** 2).sum(), R0.size]), op=MPI.SUM)
        scale = math.sqrt(sums[4] / sums[5])
        rms = [math.sqrt(sums[i] / sums[i + 1]) / scale if sums[i + 1] else 0.0 for i in (0, 2)]
        return {"residual_interface": rms[0], "residual_interior": rms[1],
                "interface_dofs": int(sums[1] // len(idx))}

    # ------------------------------------------------------------------ checkpoints and metrics
    def state(self):
        return {"step": self.step, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "history": self.history, "validation": self.validation, "diverged": self.diverged,
                "config": self.config}

    def save_checkpoint(self, path=None):
        """Write the checkpoint (rank 0, atomically: a temporary file renamed over the old
        one, so an interruption leaves the previous checkpoint intact) and the metrics.
        Collective."""
        path = path or self.checkpoint_path
        # Each rank's warm starts (its part of every stored solution): a resumed run starts its
        # solves where the uninterrupted one would, and takes the same steps.
        warm = {name: self.comm.gather(layer.warm_starts.state(), root=0)
                for name, layer in self._layers().items()}
        if self.comm.rank == 0:
            keyed = {f"warm_starts{name}": w for name, w in warm.items()}
            checkpoint.save(path, {**self.state(), **keyed})
            self.write_metrics()
        self.comm.barrier()

    def load_checkpoint(self, path):
        """Continue from a checkpoint made with a compatible config (InputError otherwise, on
        every rank). Collective."""
        err, state = None, None
        try:
            state = checkpoint.load(path, map_location=self.device)
            differ = _resume_differences(state["config"], self.config)
            if differ:
                err = (f"checkpoint {path} was made with " + ", ".join(
                    f"{name} = {old!r} (the config now says {new!r})" for name, old, new in differ)
                    + ": use another train.out or set train.resume = false")
        except checkpoint.CheckpointError as e:
            err = f"cannot resume from {path}: {e}"
        except KeyError as e:
            err = f"cannot resume from {path}: it holds no {e}"
        raise_on_all_ranks(self.comm, err)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        self.history, self.validation = state["history"], state["validation"]
        self.diverged = state["diverged"]
        for name, layer in self._layers().items():
            warm = state.get(f"warm_starts{name}")
            if warm is not None and len(warm) == self.comm.size:
                # (On another rank count the ranks hold other parts: the solves start cold.)
                layer.warm_starts.load_state(checkpoint.to_arrays(warm[self.comm.rank]))

    def _layers(self):
        """The constraint layers whose warm starts a checkpoint keeps, by the suffix of their
        key: the model's, and the global layer of model.global_steps."""
        layers = {"": self.model.constraint, "_global": getattr(self._global, "constraint", None)}
        return {name: layer for name, layer in layers.items() if layer is not None}

    def write_metrics(self):
        """metrics.json (config, per-step records, validations, failures) and metrics.csv (one
        row per step) in ``out``. Rank 0 only."""
        doc = {"config": self.config, "steps": self.history, "validation": self.validation,
               "diverged": self.diverged}
        write_atomic(os.path.join(self.out, "metrics.json"),
                     lambda f: f.write(json.dumps(doc, indent=1, default=float).encode()))
        fields = ["step", "loss", "physics", "supervised", "lr", "time", "skipped",
                  "rank_deficient"]
        text = io.StringIO()
        w = csv.DictWriter(text, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(self.history)
        write_atomic(os.path.join(self.out, "metrics.csv"),
                     lambda f: f.write(text.getvalue().encode()))
