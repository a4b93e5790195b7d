"""Run configurations: small TOML files over documented defaults.

A config has four sections; anything left out takes the default below. Example::

    [pde]
    name = "reaction_diffusion"      # fem_moe.pdes.REGISTRY, or "package.module:ClassName"
    options = { n = 8 }             # the PDE's own options

    [data]
    path = "data/rd.h5"              # relative to the config file
    n_train = 32
    n_val = 8
    n_test = 8

    [model]
    kind = "moe"                     # soft | pihc | moe
    n_basis = 16
    n_experts = 4

    [train]
    loss = "physics"                 # physics | supervised | mixed
    steps = 200
"""
import copy
import os
import tomllib

from .errors import InputError

__all__ = ["DEFAULTS", "load_config", "as_config", "apply_overrides", "validate"]

DEFAULTS = {
    "pde": {
        "name": "reaction_diffusion",
        "options": {},
    },
    "data": {
        "path": "data.h5",
        "n_train": 32,          # samples, in this order in the file: train, val, test
        "n_val": 8,
        "n_test": 8,
        "seed": 0,              # of the input distribution
    },
    "model": {
        "kind": "moe",          # soft | pihc | moe
        "n_basis": 16,
        "n_experts": 2,         # moe only
        # moe only: ptscotch | strips (slabs across x) | random (a control)
        "partitioner": "ptscotch",
        # moe only: auto (canonical up to 250k cells) | canonical (rank-count independent; every
        # rank holds the mesh) | distributed (no rank holds the mesh)
        "partition": "auto",
        "mode": "lstsq",        # lstsq | galerkin
        # moe only: experts solved together on the stitched field (False: the paper's independent
        # experts)
        "coupled": True,
        # moe only: the coupled SNES's (fem_moe.coupling.DEFAULT_COUPLING_PARAMETERS)
        "coupling_parameters": {},
        # auto (the layer's: dual, dual_blocks for mixtures) | euclidean | lumped | dual |
        # dual_blocks: the least-squares residual's norm (fem_moe.norms)
        "norm": "auto",
        # each sample's solve from its last solution (fem_moe.warmstart; the decision record on
        # warm starts)
        "warm_start": True,
        # MiB per rank for each sample's Jacobian at its last solution (Galerkin warm starts:
        # fem_moe.warmstart.SampleJacobians); 0: none
        "warm_start_memory": 1024,
        # > 0: the solves' SNES rtol in training steps (evaluation keeps the options'); 0: the
        # options' (1e-8 trained worse: benchmarks/studies/training_options.py)
        "training_rtol": 0.0,
        # moe only: the first global_steps training steps train the backbone through the global
        # layer (PI-HC) on the same basis, then the mixture trains on with the same optimiser (from
        # scratch a mixture's basis can learn only what its per-expert coefficients use)
        "global_steps": 0,
        "backbone": "deeponet",     # deeponet | fno (fem_moe.backbones)
        # a checkpoint.pt whose backbone weights start this model's (e.g. a PI-HC run's, to train a
        # mixture from it); "": random
        "backbone_from": "",
        # auto (one per GPU per node with CUDA, else every rank) | all | a list of ranks holding
        # rank 0 (fem_moe.bridge.BackboneRanks)
        "backbone_ranks": "auto",
        "width": 64,            # hidden width (deeponet MLPs; fno channels)
        "depth": 3,             # deeponet: MLP layers; fno: Fourier layers
        "latent": 64,           # deeponet: branch/trunk latent size
        # deeponet: random Fourier features of the coordinates the trunk also sees (0: none)
        "fourier_features": 0,
        # deeponet: their frequencies' standard deviation, cycles per half-width of the mesh
        "fourier_scale": 3.0,
        "grid": 32,             # fno: grid nodes per axis over the mesh's bounding box
        "modes": 8,             # fno: Fourier modes kept per axis
        # fno: each layer adds a pointwise product of two projections of its channels (quadratic
        # terms such as advection)
        "fno_products": False,
        "ridge": "rank_deficient",  # rank_deficient | always: when the reduced solve adds rho w
        # rho = ridge_factor x mean diagonal of the Gauss-Newton matrix; 0: the layers' (1e-4 with
        # ridge = always, the paper's; 1e-10 for a rank-deficient basis)
        "ridge_factor": 0.0,
        "solver_parameters": {},    # the reduced SNES's (fem_moe.DEFAULT_SOLVER_PARAMETERS)
    },
    "train": {
        "loss": "physics",      # physics | supervised | mixed
        # dual | l2 (= euclidean) | lumped: the physics loss's norm (fem_moe.residual_loss)
        "residual_norm": "dual",
        "physics_weight": 1.0,  # mixed: physics_weight * physics + supervised_weight * supervised
        "supervised_weight": 1.0,
        "steps": 100,
        "batch_size": 4,
        "lr": 1e-3,
        "schedule": "cosine",   # none | cosine | step
        "step_size": 100,       # step schedule: lr *= gamma every step_size steps
        "gamma": 0.5,
        "min_lr": 0.0,          # cosine schedule's floor
        # lr rises linearly from lr/warmup_steps to the schedule's over these steps (a fresh Adam's
        # first steps move every weight by ~lr: a trained backbone, model.backbone_from, is thrown
        # off)
        "warmup_steps": 0,
        "val_every": 20,
        "checkpoint_every": 20,
        "seed": 0,              # of the initial weights and the batch order
        # physics loss only: every step a new batch drawn from the PDE's inputs (data.n_train
        # unused)
        "fresh_inputs": False,
        "on_diverge": "skip",   # skip | stop: what a diverging expert solve does to the step
        # skip: stop (checkpoint, then SolverDivergedError) after this many skipped steps in a row;
        # 0: never
        "max_skipped_in_a_row": 50,
        "out": "runs/default",  # relative to the config file: checkpoint.pt, metrics.json/csv
        "resume": True,         # continue from out/checkpoint.pt when it exists
        "progress": True,       # tqdm bar on rank 0
        "dtype": "float64",     # float64 | float32 (the backbone's; solves are float64)
    },
}

CHOICES = {
    ("model", "kind"): ("soft", "pihc", "moe"),
    ("model", "mode"): ("lstsq", "galerkin"),
    ("model", "partitioner"): ("ptscotch", "strips", "random"),
    ("model", "partition"): ("auto", "canonical", "distributed"),
    ("model", "ridge"): ("rank_deficient", "always"),
    ("model", "backbone"): ("deeponet", "fno"),
    ("train", "loss"): ("physics", "supervised", "mixed"),
    ("train", "schedule"): ("none", "cosine", "step"),
    ("train", "residual_norm"): ("dual", "l2", "euclidean", "lumped"),
    ("model", "norm"): ("auto", "euclidean", "lumped", "dual", "dual_blocks"),
    ("train", "on_diverge"): ("skip", "stop"),
    ("train", "dtype"): ("float64", "float32"),
}
# Free-form tables (checked by their owners: the PDE, the SNES).
FREE = {("pde", "options"), ("model", "solver_parameters"), ("model", "coupling_parameters")}
PATHS = (("data", "path"), ("train", "out"), ("model", "backbone_from"))
UNSET_WHEN_EMPTY = {("model", "backbone_from")}     # "" means none, not the config's directory


def _merge(defaults, given, where, source):
    out = copy.deepcopy(defaults)
    for key, value in given.items():
        if key not in defaults:
            raise InputError(f"{source}: unknown {'section' if not where else 'option'} "
                             f"{'.'.join(where + (key,))!r}; valid: {sorted(defaults)}")
        path = where + (key,)
        if isinstance(defaults[key], dict) and path not in FREE:
            if not isinstance(value, dict):
                raise InputError(f"{source}: [{'.'.join(path)}] must be a table")
            out[key] = _merge(defaults[key], value, path, source)
        else:
            out[key] = value
    return out


def validate(config, source="config"):
    """Check types and choices; InputError naming the option otherwise. Returns config."""
    for section, options in DEFAULTS.items():
        for key, default in options.items():
            value, name = config[section][key], f"{section}.{key}"
            if (section, key) in FREE:
                ok = isinstance(value, dict)
            elif (section, key) == ("model", "backbone_ranks"):
                ok = value in ("auto", "all") or (isinstance(value, list) and bool(value) and all(
                    isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in value))
                if not ok:
                    raise InputError(f"{source}: {name} = {value!r}; \"auto\", \"all\" or a "
                                     "list of ranks")
            elif isinstance(default, bool):
                ok = isinstance(value, bool)
            elif isinstance(default, int):
                ok = isinstance(value, int) and not isinstance(value, bool)
            elif isinstance(default, float):
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            else:
                ok = isinstance(value, type(default))
            if not ok:
                raise InputError(f"{source}: {name} = {value!r} should be a "
                                 f"{type(default).__name__}")
            if (section, key) in CHOICES and value not in CHOICES[section, key]:
                raise InputError(f"{source}: {name} = {value!r}; choose one of "
                                 f"{CHOICES[section, key]}")
    for name in ("n_train", "n_val", "n_test"):
        if config["data"][name] < (1 if name == "n_train" else 0):
            raise InputError(f"{source}: data.{name} = {config['data'][name]} is too small")
    for name in ("steps", "batch_size", "val_every", "checkpoint_every", "step_size"):
        if config["train"][name] < 1:
            raise InputError(f"{source}: train.{name} must be >= 1")
    if config["model"]["global_steps"] < 0 or (config["model"]["global_steps"]
                                               and config["model"]["kind"] != "moe"):
        raise InputError(f"{source}: model.global_steps = {config['model']['global_steps']} needs "
                         f"model.kind = 'moe' and >= 0 (the kind is {config['model']['kind']!r})")
    if config["train"]["warmup_steps"] < 0:
        raise InputError(f"{source}: train.warmup_steps must be >= 0 (0: none)")
    if config["train"]["max_skipped_in_a_row"] < 0:
        raise InputError(f"{source}: train.max_skipped_in_a_row must be >= 0 (0: never stop)")
    from .pdes import lookup
    try:
        lookup(config["pde"]["name"])
    except InputError as e:
        raise InputError(f"{source}: pde.name: {e}") from None
    if config["model"]["n_basis"] < 1 or config["model"]["n_experts"] < 1:
        raise InputError(f"{source}: model.n_basis and model.n_experts must be >= 1")
    if config["model"]["fourier_features"] < 0 or not config["model"]["fourier_scale"] > 0:
        raise InputError(f"{source}: model.fourier_features must be >= 0 and model.fourier_scale "
                         f"> 0, got {config['model']['fourier_features']} and "
                         f"{config['model']['fourier_scale']}")
    return config


def apply_overrides(config, overrides, source="--set"):
    """``overrides``: strings "section.key=value" (value in TOML syntax, or a bare string)."""
    config = copy.deepcopy(config)
    for item in overrides or ():
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise InputError(f"{source} {item!r}: expected section.key=value")
        key, text = item.split("=", 1)
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text
        *sections, last = key.strip().split(".")
        node = config
        for s in sections:
            if not isinstance(node.get(s), dict):
                raise InputError(f"{source} {item!r}: unknown section {s!r}")
            node = node[s]
        if last not in node and tuple(sections) not in FREE:
            raise InputError(f"{source} {item!r}: unknown option {key!r}")
        node[last] = value
    return config


def load_config(path=None, overrides=(), base_dir=None):
    """The config in TOML file ``path`` (or the defaults when None) with ``overrides`` applied
    and relative paths resolved against the file's directory (or ``base_dir``). Validated."""
    given = {}
    if path is not None:
        if not os.path.isfile(path):
            raise InputError(f"config file {path!r} not found")
        try:
            with open(path, "rb") as f:
                given = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise InputError(f"{path}: not valid TOML: {e}") from None
        base_dir = base_dir or os.path.dirname(os.path.abspath(path))
    config = _merge(DEFAULTS, given, (), path or "defaults")
    config = apply_overrides(config, overrides)
    base_dir = base_dir or os.getcwd()
    for section, key in PATHS:
        if config[section][key] or (section, key) not in UNSET_WHEN_EMPTY:
            given = os.path.expanduser(config[section][key])
            config[section][key] = os.path.normpath(os.path.join(base_dir, given))
    return validate(config, path or "config")


def as_config(config):
    """A validated config from ``config``: a TOML file's path, None (the defaults), or a dict
    over :data:`DEFAULTS` (the sections and entries it leaves out take their defaults; its data
    path and output directory are taken relative to the working directory)."""
    if config is None or isinstance(config, (str, os.PathLike)):
        return load_config(config)
    if not isinstance(config, dict):
        raise InputError(f"config must be a path or a dict, got {type(config).__name__}")
    merged = _merge(DEFAULTS, config, (), "config")
    for section, key in (("data", "path"), ("train", "out")):
        merged[section][key] = os.path.abspath(merged[section][key])
    return validate(merged)
