"""Stage 2: generated training images (editing forgeries, widened reals, Stable Diffusion fakes).

Light imports only: ``diffusers``/``torch`` are loaded by :mod:`dfpipe.augment_sd.diffusion` when a
diffusion model is actually configured.
"""

from .editing import METHODS, NEEDS_DONOR, get_method, region_mask
from .pipeline import run
from .real import widen_real

__all__ = ["METHODS", "NEEDS_DONOR", "get_method", "region_mask", "run", "widen_real"]
