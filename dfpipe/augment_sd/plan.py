"""Stage 2's plan: every image to make, in output order, each with its own seed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..config import AugmentConfig
from ..data.landmarks import check_landmarker
from ..errors import ConfigError
from .editing import METHODS, NEEDS_DONOR

WIDEN = "widen_real"
SD_PREFIX = "sd_"
RECON_REAL = "recon_real"  # the real image of a reconstruction pair when post-processing made a new one
REAL_KINDS = ("widen", "recon_real")  # job kinds whose images are real (label 0)
# Seed streams: a row's seed depends on (cfg.seed, stream, index) only.
_STREAMS = {"plan": 0, "edit": 1, "widen": 2, "sd": 3, "recon": 4}


@dataclass(frozen=True)
class Job:
    """One image to generate: ``source``/``donor`` index the real-image table (-1 = no donor)."""

    kind: str  # edit | widen | sd | recon | recon_real
    method: str
    source: int
    donor: int
    seed: int


def item_seed(base: int, stream: str, index: int) -> int:
    """A 63-bit seed for row ``index`` of ``stream``, independent of how many rows there are."""
    state = np.random.SeedSequence([int(base), _STREAMS[stream], int(index)]).generate_state(1, np.uint64)
    return int(state[0]) & (2**63 - 1)


def _check_cfg(cfg: AugmentConfig) -> tuple[list[str], np.ndarray]:
    """Validate numbers and method names; return method names and normalised weights."""
    unknown = sorted(set(cfg.methods) - set(METHODS))
    if unknown:
        raise ConfigError(f"augment_sd.methods: unknown method(s) {unknown}; valid: {sorted(METHODS)}")
    names = list(cfg.methods)
    weights = np.array([cfg.methods[n] for n in names], dtype=np.float64)
    if (weights < 0).any() or not np.isfinite(weights).all():
        raise ConfigError(f"augment_sd.methods: weights must be finite and >= 0, got {dict(cfg.methods)}")
    for field_name in ("fakes_per_real", "real_widening"):
        if getattr(cfg, field_name) < 0:
            raise ConfigError(f"augment.{field_name} must be >= 0, got {getattr(cfg, field_name)}")
    if cfg.fakes_per_real > 0 and weights.sum() <= 0:
        raise ConfigError("augment_sd.methods: fakes_per_real > 0 but no method has a positive weight")
    check_landmarker(cfg.landmarks)  # unknown name or package not installed: fail before any work
    d = cfg.diffusion
    if d.model:
        from .diffusion import check_config

        check_config(d)
        if not 0.0 <= d.fraction <= 1.0 or d.per_image < 1:
            raise ConfigError(f"augment_sd.diffusion: need 0 <= fraction <= 1 and per_image >= 1, got "
                             f"fraction={d.fraction}, per_image={d.per_image}")
    if cfg.reconstruct.per_real:
        from .reconstruct import check_config as check_reconstruct

        check_reconstruct(cfg.reconstruct)
    total = weights.sum()
    return names, (weights / total if total > 0 else weights)


def _spread(rng: np.random.Generator, n_items: int, n: int) -> np.ndarray:
    """``n`` indices into ``n_items``: whole shuffled passes, so every item is used once before twice."""
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    passes = -(-n // n_items)
    return np.concatenate([rng.permutation(n_items) for _ in range(passes)])[:n]


def _donors(rng: np.random.Generator, sources: np.ndarray, n_items: int) -> np.ndarray:
    """A random *other* image for each source (itself only when there is a single real image)."""
    if n_items == 1:
        return sources.copy()
    d = rng.integers(0, n_items - 1, size=len(sources))
    return d + (d >= sources)  # skip the source itself without rejection sampling


def plan_jobs(cfg: AugmentConfig, n_real: int, sizes: Sequence[tuple[int, int]] | None = None) -> list[Job]:
    """Every image to make, in output order: editing fakes, widened reals, diffusion fakes, reconstructions.

    ``sizes``: (h, w) of each real; needed only with ``reconstruct.per_real`` > 0 (a real above
    ``reconstruct.max_side`` gets a downscaled copy as its pair's real).
    """
    names, probs = _check_cfg(cfg)
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, _STREAMS["plan"]]))
    jobs: list[Job] = []
    n_edit = int(round(cfg.fakes_per_real * n_real))
    if n_edit:
        sources = _spread(rng, n_real, n_edit)
        methods = rng.choice(len(names), size=n_edit, p=probs)
        donors = _donors(rng, sources, n_real)
        for i, (src, m, donor) in enumerate(zip(sources, methods, donors)):
            name = names[m]
            donor = int(donor) if name in NEEDS_DONOR else -1
            jobs.append(Job("edit", name, int(src), donor, item_seed(cfg.seed, "edit", i)))
    n_widen = int(round(cfg.real_widening * n_real))
    for i, s in enumerate(_spread(rng, n_real, n_widen)):
        jobs.append(Job("widen", WIDEN, int(s), -1, item_seed(cfg.seed, "widen", i)))
    d = cfg.diffusion
    if d.model:
        chosen = _spread(rng, n_real, int(round(d.fraction * n_real)))
        for i, s in enumerate(np.repeat(chosen, d.per_image)):
            jobs.append(Job("sd", SD_PREFIX + d.mode, int(s), -1, item_seed(cfg.seed, "sd", i)))
    if cfg.reconstruct.per_real:
        if sizes is None or len(sizes) != n_real:
            raise ValueError("plan_jobs: reconstruction needs the size of every real image")
        jobs += plan_reconstruct(cfg, sizes)
    return jobs


def plan_reconstruct(cfg: AugmentConfig, sizes: Sequence[tuple[int, int]]) -> list[Job]:
    """Reconstruction pairs, each a fake (kind ``recon``) followed, when its drawn post-processing (or a fit
    to ``max_side``) makes a new real image, by that real (kind ``recon_real``) with the same seed.

    Its own random stream: switching reconstruction on leaves every other row of the plan as it was.
    """
    from .reconstruct.parity import draw_post

    r = cfg.reconstruct
    names = [n for n, w in r.methods.items() if w > 0]
    probs = np.array([r.methods[n] for n in names], np.float64)
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, _STREAMS["recon"]]))
    n = int(round(r.per_real * len(sizes)))
    sources = _spread(rng, len(sizes), n)
    methods = rng.choice(len(names), size=n, p=probs / probs.sum()) if n else []
    jobs = []
    for i, (src, m) in enumerate(zip(sources, methods)):
        seed = item_seed(cfg.seed, "recon", i)
        jobs.append(Job("recon", names[m], int(src), -1, seed))
        if draw_post(seed, r, *sizes[src]).new_real:
            jobs.append(Job(RECON_REAL, RECON_REAL, int(src), -1, seed))
    return jobs
