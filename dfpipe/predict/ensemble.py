"""The ensemble (experts x TTA views, combined) and the dataset that decodes image files as stage 1 does."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..data.images import DEFAULT_MAX_PIXELS, decode_image, resize_square
from ..data.transforms import to_model_input
from ..device import autocast, num_workers, pick_device
from ..errors import ConfigError, DataError
from ..metrics import verdict
from .combine import COMBINE, combine_scores
from .experts import LoadedExpert, load_expert
from .tta import TTA_VIEWS, View, parse_view

CARD_FORMAT = 1


class FileDataset(Dataset):
    """Image files -> uint8 (S, S, 3) tensors with stage 1's exact pixels (decode_image + resize_square).

    A file that cannot be decoded gives a black image and its error message instead of raising, so
    one bad upload never stops a batch; items are ``(image, index, error)`` with ``error == ""`` if OK.
    ``degrade`` (optional, picklable for worker processes) changes the full-size decoded image before
    the resize, as a re-encode or rescale on the way to us would (the evaluation's degraded copies).
    """

    def __init__(self, paths: list[str | Path], cache_size: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                 degrade: Callable[[np.ndarray], np.ndarray] | None = None):
        self.paths = [str(p) for p in paths]
        self.cache_size = int(cache_size)
        self.max_pixels = max_pixels
        self.degrade = degrade

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str]:
        try:
            img = decode_image(self.paths[i], max_pixels=self.max_pixels)
            if self.degrade is not None:
                img = self.degrade(img)
            img = resize_square(img, self.cache_size)
            return torch.from_numpy(np.ascontiguousarray(img)), i, ""
        except Exception as exc:  # noqa: BLE001 - any failure becomes a reported row, never a crash
            blank = torch.zeros((self.cache_size, self.cache_size, 3), dtype=torch.uint8)
            return blank, i, str(exc) or type(exc).__name__


class Ensemble:
    def __init__(self, experts: list[LoadedExpert], tta: list[str], combine: str, device: torch.device,
                 stack: dict | None = None, thresholds: dict | None = None):
        if not experts:
            raise ConfigError("the ensemble needs at least one expert")
        if not tta:
            raise ConfigError(f"no TTA view given; choose from {TTA_VIEWS}")
        self.views = [parse_view(v) for v in tta]
        if combine not in COMBINE:
            raise ConfigError(f"unknown combine {combine!r}; choose one of {COMBINE}")
        sizes = {e.description["cache_size"] for e in experts}
        if len(sizes) > 1:
            raise ConfigError(f"experts were trained on different cache sizes {sorted(sizes)}")
        self.experts, self.tta, self.combine, self.device = experts, list(tta), combine, device
        self.cache_size = int(sizes.pop())
        self.stack, self.thresholds = stack, thresholds

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.experts]

    @classmethod
    def load(cls, models_dir: str | Path, names: list[str], tta: list[str], combine: str,
             device: torch.device | None = None, stack: dict | None = None) -> "Ensemble":
        device = device or pick_device()
        if not names:
            raise ConfigError("predict.experts is empty: list the experts to ensemble")
        experts = [load_expert(Path(models_dir) / n / "best.pt", device) for n in names]
        return cls(experts, tta, combine, device, stack=stack)

    @classmethod
    def from_card(cls, card_path: str | Path, models_dir: str | Path,
                  device: torch.device | None = None) -> "Ensemble":
        """The ensemble stage 5 evaluated, as its card describes it (weights, thresholds included).

        Refuses checkpoints that differ from those the card was made with (retrained since).
        """
        card = json.loads(Path(card_path).read_text())
        if card.get("format") != CARD_FORMAT:
            raise DataError(f"{card_path}: unknown ensemble card format {card.get('format')!r}")
        ens = cls.load(models_dir, [e["name"] for e in card["experts"]], card["tta"], card["combine"],
                       device, stack=card.get("stack"))
        for e, want in zip(ens.experts, card["experts"]):
            if want.get("sha256") and e.sha256 != want["sha256"]:
                raise DataError(f"{models_dir}/{e.name}/best.pt is not the checkpoint {card_path} was made "
                                 "with (retrained?): rerun stage 5 (dvc repro ensemble_predict)")
        ens.thresholds = card["thresholds"]
        return ens

    def card(self, thresholds: dict, extra: dict | None = None) -> dict:
        """Everything a CLI/API needs to score and give verdicts as stage 5 did (JSON-serialisable)."""
        return {"format": CARD_FORMAT, "cache_size": self.cache_size, "tta": self.tta, "combine": self.combine,
                "stack": self.stack, "thresholds": thresholds,
                "experts": [{"name": e.name, "checkpoint": f"{e.name}/best.pt", "sha256": e.sha256,
                             "description": e.description} for e in self.experts],
                **(extra or {})}

    # -- scoring
    def _expert_probs(self, m: torch.nn.Module, x: torch.Tensor, inputs: dict) -> torch.Tensor:
        """(B,) probability of one expert, averaged over the views; ``inputs`` caches the resized,
        normalised batches by (size, mean, std) so experts that share them compute them once."""
        by_size: dict[int, list[View]] = {}
        for v in self.views:
            by_size.setdefault(v.size(m.img_size), []).append(v)
        probs = []
        for size, views in by_size.items():
            key = (size, tuple(m.mean), tuple(m.std))
            if key not in inputs:
                inputs[key] = to_model_input(x, size, m.mean, m.std, channels_last=True)
            batch = torch.cat([v.apply(inputs[key]) for v in views]) if len(views) > 1 else views[0].apply(inputs[key])
            batch = batch.contiguous(memory_format=torch.channels_last)
            with autocast(self.device):
                probs.append(m(batch)["prob"].float().view(len(views), -1))
        return torch.cat(probs).mean(0)

    @torch.inference_mode()
    def score_batch(self, x: torch.Tensor) -> np.ndarray:
        """uint8 (B, S, S, 3) -> (E, B) per-expert probabilities, averaged over TTA views."""
        x = x.to(self.device, non_blocking=True)
        inputs: dict = {}
        return np.stack([self._expert_probs(e.model, x, inputs).cpu().numpy() for e in self.experts])

    def score_loader(self, loader: DataLoader, desc: str = "score") -> np.ndarray:
        """(E, N) per-expert probabilities over a loader of uint8 batches (order kept)."""
        parts = [self.score_batch(batch[0]) for batch in tqdm(loader, desc=desc, unit="batch")]
        return np.concatenate(parts, axis=1) if parts else np.zeros((len(self.experts), 0))

    def combine_experts(self, per_expert: np.ndarray) -> np.ndarray:
        return combine_scores(per_expert, self.combine, self.stack)

    def score_images(self, images: list[np.ndarray]) -> np.ndarray:
        """Ensemble scores (N,) of uint8 RGB images of any size (same resize as stage 1)."""
        if not images:
            return np.zeros(0)
        x = torch.from_numpy(np.stack([resize_square(im, self.cache_size) for im in images]))
        return self.combine_experts(self.score_batch(x))

    def score_files(self, paths: list[str | Path], batch_size: int = 64, workers: int = -1,
                    degrade: Callable[[np.ndarray], np.ndarray] | None = None,
                    ) -> tuple[np.ndarray, list[tuple[str, str]]]:
        """Ensemble scores (N,) of image files, decoded in ``workers`` DataLoader processes (-1 = auto).

        A file that fails to decode scores NaN (the caller picks a fallback) and is listed in the
        returned ``[(path, error)]``. ``degrade`` is passed to :class:`FileDataset`.
        """
        ds = FileDataset(paths, self.cache_size, degrade=degrade)
        loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers(workers),
                            pin_memory=self.device.type == "cuda")
        per_expert = np.full((len(self.experts), len(ds)), np.nan)
        errors: list[tuple[str, str]] = []
        for x, idx, err in loader:
            ok = np.array([e == "" for e in err])
            errors += [(ds.paths[int(i)], e) for i, e in zip(idx, err) if e]
            if ok.any():
                per_expert[:, idx.numpy()[ok]] = self.score_batch(x[torch.from_numpy(ok)])
        scores = np.full(len(ds), np.nan)
        good = ~np.isnan(per_expert[0])
        if good.any():
            scores[good] = self.combine_experts(per_expert[:, good])
        return scores, errors

    def verdict(self, score: float) -> str:
        if self.thresholds is None:
            raise ValueError("no thresholds: load the ensemble with Ensemble.from_card")
        return verdict(score, self.thresholds)
