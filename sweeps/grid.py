"""Grid files: one typed loader that validates everything before any trial starts.

A grid file (YAML) names a base and what varies. Schema (every key optional unless noted):

    name: smoke                  # results/<name>/; default: the file's stem
    description: ...             # free text
    budget: smoke                # an allocation.BUDGETS key (sets base, rho grid, seeds, training)
    base: smoke                  # or a preset name (config.PRESETS); exactly one of budget / base
    rho: [1.0, 0.8, 0.6]         # routed-expert share of the sparse budget; allocate() per value
    sweep: {engram.table_sizes: [1000, 4000]}  # or one swept key: a ModelConfig dotted key or
                                 # train.<TrainConfig field>; with one rho value it is applied
                                 # after allocate(), without rho to the base (+ engram plan)
    seeds: [0, 1]
    steps: 60                    # or tokens: 2.0e6 (steps = ceil(tokens / (batch_size * seq_len)))
    batch_size: 16
    corpus: pystdlib             # "pystdlib" | "pysrc" | "pywheels-v1" | a path; $VARS and ~ are
                                 # expanded ($ENGRAM_WEB_CORPUS: the GPU ladder's web corpus)
    tokenizer: /data/tok         # a user's tokenizer (tokenizer.json or a Hugging Face folder;
                                 # $VARS and ~ expanded) instead of the BPE trained on the corpus;
                                 # its vocabulary must be the model's vocab_size; or
                                 # {path: ..., eos_token: "</s>"} when its config names no EOS
    resources: auto              # or {cpu: N, gpu: G} or {cpu: N, tpu: chips} (Ray's TPU) per
                                 # trial; G > 1 (or chips > 1) for a trial over a mesh; with
                                 # workers: W, each trial runs W JAX processes (Ray Train's
                                 # JaxTrainer), cpu/gpu/tpu then being per worker
    train: {lr: 1e-3}            # TrainConfig overrides (not steps/batch_size/seed: keys above);
                                 # mesh: {data: 2, fsdp: 2, expert: 2} splits each trial over
                                 # that many devices (engram_jax/parallel), which resources give
    model: {seq_len: 64}         # ModelConfig dotted overrides of the base, before allocation
    engram: {d_head: 8}          # the Engram plan (EngramConfig fields; table_sizes solved for
                                 # rho grids)

Errors raise ``GridError`` (a ValueError) naming the key, before anything is written.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from engram_jax.allocation import BUDGETS, allocate, default_engram
from engram_jax.config import PRESETS, EngramConfig, ModelConfig, TrainConfig
from engram_jax.parallel.mesh import check_mesh

ALLOWED_KEYS = (
    "name", "description", "budget", "base", "rho", "sweep", "seeds", "steps", "tokens",
    "batch_size", "corpus", "tokenizer", "resources", "train", "model", "engram",
)
_TRAIN_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))
_ENGRAM_FIELDS = tuple(f.name for f in dataclasses.fields(EngramConfig))
_RESERVED_TRAIN = ("steps", "batch_size", "seed")  # set by the grid's own keys


class GridError(ValueError):
    """An invalid grid file; the message names the file and the offending key."""


@dataclass(frozen=True)
class TrialSpec:
    """One trial: what to train, on what, and the fields every result row carries."""

    trial_id: str
    model: ModelConfig
    train: TrainConfig
    corpus: str
    meta: dict[str, Any]  # grid, trial_id, rho, rho_actual, seed, budget, preset, sweep_key, sweep_value
    tokenizer: str | None = None  # a user's tokenizer (None: the BPE trained on the corpus)
    eos_token: str | None = None  # its EOS token, when its config names none


@dataclass(frozen=True)
class Grid:
    """A validated grid: its settings and the fully built trials."""

    name: str
    path: Path
    budget: str | None
    preset: str
    corpus: str
    resources: str | dict[str, int]
    trials: tuple[TrialSpec, ...]
    raw: dict[str, Any] = field(repr=False)
    tokenizer: str | None = None

    @property
    def trial_ids(self) -> list[str]:
        return [t.trial_id for t in self.trials]


def load_grid(path: str | Path, *, check_corpus: bool = True) -> Grid:
    """Read, validate and expand a grid file into trials.

    Every rho is allocated and every config built here, the corpus is checked
    (``engram_jax.data.check_corpus``: it exists and, if prepared, a stat of its files matches the
    manifest of its preparation) and the tokenizer loaded and checked against every trial's
    vocabulary, so an invalid grid fails before any trial starts.

    Raises:
      GridError: malformed YAML, an unknown key (the allowed ones are listed), rho outside [0, 1],
        an infeasible allocation, an unknown budget or preset, a missing or empty corpus, or any
        invalid config value.
    """
    path = Path(path)
    where = str(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise GridError(f"grid file {where} not found") from None
    except yaml.YAMLError as e:
        raise GridError(f"{where}: malformed YAML: {e}") from None
    if not isinstance(raw, dict):
        raise GridError(f"{where}: a grid file must be a YAML mapping, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(ALLOWED_KEYS))
    if unknown:
        raise GridError(f"{where}: unknown key(s) {unknown}; allowed keys: {', '.join(ALLOWED_KEYS)}")

    def fail(msg: str) -> GridError:
        return GridError(f"{where}: {msg}")

    name = str(raw.get("name", path.stem))
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise fail(f"name {name!r} must be letters, digits, '.', '_' or '-' (it names a folder)")

    # base and budget
    if ("budget" in raw) == ("base" in raw):
        raise fail("give exactly one of 'budget' (an allocation.BUDGETS key) or 'base' (a preset)")
    budget = None
    if "budget" in raw:
        if raw["budget"] not in BUDGETS:
            raise fail(f"unknown budget {raw['budget']!r}; known budgets: {', '.join(BUDGETS)}")
        budget = BUDGETS[raw["budget"]]
        preset_name = budget.preset
    else:
        preset_name = raw["base"]
        if preset_name not in PRESETS:
            raise fail(f"unknown base preset {preset_name!r}; known presets: {', '.join(sorted(PRESETS))}")
    base = PRESETS[preset_name]
    model_o = _mapping(raw, "model", fail)
    try:
        base = base.with_overrides(model_o) if model_o else base
    except (ValueError, TypeError) as e:
        raise fail(f"model overrides {model_o}: {e}") from None

    engram_raw = _mapping(raw, "engram", fail)
    bad = sorted(set(engram_raw) - set(_ENGRAM_FIELDS))
    if bad:
        raise fail(f"unknown engram key(s) {bad}; allowed: {', '.join(_ENGRAM_FIELDS)}")
    plan = None
    if engram_raw:
        start = budget.engram if budget and budget.engram else None
        if start is None:
            start = default_engram(base) if base.moe is not None and base.engram is None else None
        try:
            plan = (dataclasses.replace(start, **engram_raw) if start is not None
                    else EngramConfig(**{"table_sizes": (2,) * (engram_raw.get("max_ngram", 3) - 1),
                                         **engram_raw}))
        except (ValueError, TypeError) as e:
            raise fail(f"engram {engram_raw}: {e}") from None
    elif budget is not None:
        plan = budget.engram

    # rho and sweep
    rhos = raw.get("rho")
    sweep = _mapping(raw, "sweep", fail) or None
    if rhos is not None:
        if not isinstance(rhos, list) or not rhos:
            raise fail(f"rho must be a non-empty list of numbers in [0, 1], got {rhos!r}")
        for r in rhos:
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= r <= 1.0:
                raise fail(f"rho {r!r} is outside [0, 1] (rho is the routed-expert share of the sparse budget)")
        if len(set(rhos)) != len(rhos):
            raise fail(f"rho has duplicates: {rhos}")
        rhos = [float(r) for r in rhos]
    if sweep is not None:
        if len(sweep) != 1:
            raise fail(f"sweep takes exactly one key, got {sorted(sweep)}")
        if rhos is not None and len(rhos) != 1:
            raise fail("with 'sweep', give at most one rho value (the point the sweep starts from)")
        skey, svalues = next(iter(sweep.items()))
        if not isinstance(svalues, list) or not svalues:
            raise fail(f"sweep.{skey} must be a non-empty list of values")
    elif rhos is None:
        if budget is None:
            raise fail("give 'rho' (a list) or 'sweep' (one key with a list of values)")
        rhos = list(budget.rhos)

    seeds = raw.get("seeds", list(budget.seeds) if budget else [0])
    if (not isinstance(seeds, list) or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)
            or len(set(seeds)) != len(seeds)):
        raise fail(f"seeds must be a non-empty list of distinct non-negative integers, got {seeds!r}")

    # training settings
    train_o = _mapping(raw, "train", fail)
    bad = sorted(set(train_o) - set(_TRAIN_FIELDS))
    if bad:
        raise fail(f"unknown train key(s) {bad}; allowed: {', '.join(_TRAIN_FIELDS)}")
    reserved = sorted(set(train_o) & set(_RESERVED_TRAIN))
    if reserved:
        raise fail(f"train.{reserved[0]}: use the top-level 'steps'/'tokens', 'batch_size' and 'seeds' keys")
    train_base = dict(budget.train_overrides()) if budget else {}
    train_base.update(train_o)
    if "batch_size" in raw:
        train_base["batch_size"] = raw["batch_size"]
    if "steps" in raw and "tokens" in raw:
        raise fail("give 'steps' or 'tokens', not both")
    if "steps" in raw:
        train_base["steps"] = raw["steps"]
    for k in ("steps", "batch_size"):
        v = train_base.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise fail(f"{k} must be a positive integer, got {v!r}")
    tokens = _number(raw.get("tokens"))
    if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, (int, float))
                               or not math.isfinite(tokens) or tokens <= 0):
        raise fail(f"tokens must be a positive number, got {raw.get('tokens')!r}")

    corpus = _expand_corpus(str(raw.get("corpus", budget.corpus if budget else "pystdlib")),
                            fail if check_corpus else None)
    resources = _resources(raw.get("resources", "auto"), fail)
    if check_corpus:
        _check_corpus(corpus, fail)
    tokenizer, eos_token = _tokenizer(raw.get("tokenizer"), fail)

    # expand into trials
    points: list[tuple[float | None, str | None, Any]] = []
    if sweep is None:
        points = [(r, None, None) for r in rhos]
    else:
        points = [(rhos[0] if rhos else None, skey, v) for v in svalues]
    trials, seen = [], set()
    for rho, skey_, sval in points:
        try:
            cfg = base
            if rho is not None:
                cfg = allocate(base, rho, plan)
            elif plan is not None:
                cfg = dataclasses.replace(base, engram=plan)
        except ValueError as e:
            raise fail(f"infeasible allocation at rho={rho}: {e}") from None
        t_over = dict(train_base)
        if skey_ is not None:
            if skey_.startswith("train."):
                tk = skey_.split(".", 1)[1]
                if tk not in _TRAIN_FIELDS or tk in _RESERVED_TRAIN:
                    raise fail(f"sweep key {skey_!r}: not a sweepable TrainConfig field")
                t_over[tk] = sval
            else:
                value = sval
                if skey_ == "engram.table_sizes" and isinstance(sval, int) and cfg.engram is not None:
                    value = [sval] * (cfg.engram.max_ngram - 1)
                try:
                    cfg = cfg.with_overrides({skey_: value})
                except (ValueError, TypeError) as e:
                    raise fail(f"sweep {skey_}={sval!r}: {e}") from None
        if tokens is not None:
            t_over["steps"] = max(1, math.ceil(tokens / (t_over.get("batch_size", TrainConfig.batch_size) * cfg.seq_len)))
        for seed in seeds:
            try:
                tcfg = TrainConfig(**{**t_over, "seed": seed})
            except (ValueError, TypeError) as e:
                raise fail(f"train settings {t_over}: {e}") from None
            try:
                check_mesh(tcfg.mesh, cfg, tcfg)
            except ValueError as e:
                raise fail(f"train.mesh: {e}") from None
            _check_mesh_resources(tcfg.mesh, resources, fail)
            tid = _trial_id(rho, skey_, sval, seed)
            if tid in seen:
                raise fail(f"two trials share the id {tid!r}; make the rho / sweep values distinct")
            seen.add(tid)
            meta = {
                "grid": name, "trial_id": tid, "rho": rho, "rho_actual": cfg.param_counts()["rho"],
                "seed": seed, "budget": budget.name if budget else "", "preset": preset_name,
                "sweep_key": skey_ or "", "sweep_value": "" if skey_ is None else _fmt(sval),
            }
            trials.append(TrialSpec(tid, cfg, tcfg, corpus, meta, tokenizer, eos_token))
    # Seed-major order (every point of seed 0, then of seed 1 ...): a grid stopped part-way still
    # holds whole curves of its first seeds.
    order = {s: i for i, s in enumerate(seeds)}
    trials.sort(key=lambda t: order[t.train.seed])  # stable: point order within a seed
    if tokenizer is not None and check_corpus:
        _check_tokenizer(tokenizer, eos_token, {t.model.vocab_size for t in trials}, fail)
    return Grid(name=name, path=path, budget=budget.name if budget else None, preset=preset_name,
                corpus=corpus, resources=resources, trials=tuple(trials), raw=raw,
                tokenizer=tokenizer)


def _number(v: Any) -> Any:
    """PyYAML (YAML 1.1) reads ``2.0e+6`` as a float but ``2.0e6`` and ``5e6`` as strings: accept both."""
    if isinstance(v, str):
        try:
            return float(v.strip())
        except ValueError:
            return v
    return v


def _mapping(raw: dict, key: str, fail) -> dict:
    v = raw.get(key) or {}
    if not isinstance(v, dict):
        raise fail(f"{key} must be a mapping, got {type(v).__name__}")
    return dict(v)


def _resources(v, fail) -> str | dict[str, int]:
    if v == "auto":
        return "auto"
    if not isinstance(v, dict):
        raise fail(f"resources must be 'auto' or a mapping {{cpu: N, gpu: N, tpu: N}}, got {v!r}")
    bad = sorted(set(v) - {"cpu", "gpu", "tpu", "workers"})
    if bad:
        raise fail(f"unknown resources key(s) {bad}; allowed: cpu, gpu, tpu, workers")
    cpu, gpu, tpu = v.get("cpu", 1), v.get("gpu", 0), v.get("tpu", 0)
    workers = v.get("workers", 1)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise fail(f"resources.workers must be an integer >= 1 (JAX processes per trial), got "
                   f"{workers!r}")
    if not isinstance(cpu, int) or cpu < 1:
        raise fail(f"resources.cpu must be an integer >= 1, got {cpu!r}")
    if isinstance(gpu, bool) or not isinstance(gpu, int) or gpu < 0:
        raise fail(f"resources.gpu must be an integer >= 0 (GPUs per trial), got {gpu!r}")
    if not isinstance(tpu, int) or tpu < 0 or (tpu and gpu):
        raise fail(f"resources.tpu must be an integer >= 0 (TPU chips per trial, Ray's TPU "
                   f"resource) and not combined with gpu, got tpu={tpu!r}, gpu={gpu!r}")
    out = {"cpu": cpu, "gpu": gpu, "tpu": tpu}
    if workers > 1:
        out["workers"] = workers
    return out


def _check_mesh_resources(mesh, resources, fail) -> None:
    """A trial over a mesh of N devices asks for N GPUs or N TPU chips (or, on the CPU, runs on
    N simulated devices: sweeps.trainable sets XLA's host device count); a one-device trial
    asks for at most one."""
    if resources == "auto":
        if mesh.size > 1:
            raise fail(f"train.mesh {mesh} uses {mesh.size} devices per trial: give resources "
                       f"{{cpu: N, gpu: {mesh.size}}} (or tpu: {mesh.size}, or gpu: 0 for CPU "
                       "devices)")
        return
    workers = resources.get("workers", 1)
    accel = resources.get("gpu", 0) or resources.get("tpu", 0)
    if mesh.size == 1 and workers == 1 and not resources.get("gpu", 0) > 1:
        return  # one device (a TPU host's chips asked for whole, as before)
    if accel and accel * workers != mesh.size:
        kind = "gpu" if resources.get("gpu", 0) else "tpu"
        per = f" x {workers} workers = {accel * workers} devices" if workers > 1 else ""
        raise fail(f"resources.{kind}={accel}{per} but train.mesh {mesh} uses {mesh.size} "
                   f"device(s) per trial: they must be equal")
    if mesh.size % workers:
        raise fail(f"train.mesh {mesh} ({mesh.size} devices) does not split over "
                   f"{workers} workers")


def _expand_corpus(spec: str, fail) -> str:
    """A corpus spec with its environment variables expanded (``$ENGRAM_WEB_CORPUS``, ``~``); an
    unset variable is an error, or (``fail`` None: a grid loaded without its corpus check) the
    spec as written."""
    if "$" not in spec and not spec.startswith("~"):
        return spec
    expanded = os.path.expanduser(os.path.expandvars(spec))
    unset = sorted(set(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", expanded)))
    if unset and fail is None:
        return spec
    if unset:
        raise fail(f"corpus {spec!r}: environment variable {', '.join(unset)} is not set; set it to "
                   "the corpus folder (README: 'The GPU ladder' names the web corpus and how to "
                   "download and prepare it)")
    return expanded


def _check_corpus(spec: str, fail) -> None:
    # Imported here (it pulls in the input pipeline) but never optional: a failed import is an
    # error, not a grid that skips its corpus check.
    from engram_jax.data import check_corpus

    try:
        check_corpus(spec)
    except (FileNotFoundError, ValueError) as e:
        raise fail(f"corpus: {e}") from None


def _tokenizer(v: Any, fail) -> tuple[str | None, str | None]:
    """(path, eos_token) of the grid's ``tokenizer`` key: a path or {path, eos_token}."""
    if v is None:
        return None, None
    eos = None
    if isinstance(v, dict):
        unknown = sorted(set(v) - {"path", "eos_token"})
        if unknown or not isinstance(v.get("path"), str):
            raise fail(f"tokenizer must be a path or {{path: PATH, eos_token: TOKEN}}, got {v!r}")
        v, eos = v["path"], v.get("eos_token")
        if eos is not None and not isinstance(eos, str):
            raise fail(f"tokenizer.eos_token must be a string, got {eos!r}")
    if not isinstance(v, str) or not v:
        raise fail(f"tokenizer must be a path, got {v!r}")
    expanded = os.path.expanduser(os.path.expandvars(v))
    unset = sorted(set(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", expanded)))
    if unset:
        raise fail(f"tokenizer {v!r}: environment variable {', '.join(unset)} is not set")
    return expanded, eos


def _check_tokenizer(path: str, eos_token: str | None, vocab_sizes: set[int], fail) -> None:
    """The tokenizer loads, has an EOS token and as many ids as every trial's model."""
    from engram_jax.data import load_tokenizer_spec

    try:
        spec = load_tokenizer_spec(path, eos_token=eos_token)
    except ValueError as e:
        raise fail(f"tokenizer: {e}") from None
    bad = sorted(v for v in vocab_sizes if v != spec.vocab_size)
    if bad:
        raise fail(f"tokenizer {path} has a vocabulary of {spec.vocab_size:,} ids but the model's "
                   f"vocab_size is {', '.join(f'{v:,}' for v in bad)}: set model: {{vocab_size: "
                   f"{spec.vocab_size}}} (or use a tokenizer of that size)")


def _fmt(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return "x".join(_fmt(x) for x in v)
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _trial_id(rho: float | None, skey: str | None, sval: Any, seed: int) -> str:
    """Stable, readable ids: ``rho0.80-s0`` or ``table_sizes4001-s0``."""
    parts = []
    if rho is not None and skey is None:
        parts.append(f"rho{rho:.2f}")
    if skey is not None:
        parts.append(re.sub(r"[^A-Za-z0-9._-]", "_", f"{skey.rsplit('.', 1)[-1]}{_fmt(sval)}"))
    return "-".join(parts + [f"s{seed}"])
