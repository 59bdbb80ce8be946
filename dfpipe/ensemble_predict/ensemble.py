"""The ensemble (experts x TTA views, combined) and the dataset that decodes image files as stage 1 does."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..data.dataset import StoreDataset
from ..data.images import decode_image
from ..data.preprocess import InputPolicy, Preprocess, Stage1, fit, scoring_image
from ..data.transforms import to_model_input
from ..device import autocast, num_workers, pick_device
from ..errors import ConfigError, DataError
from ..metrics import verdict
from .combine import COMBINE, combine_scores
from .experts import LoadedExpert, load_expert
from .gpu_decode import DECODE_MODES, device_batches, device_refusal
from .tta import TTA_VIEWS, View, parse_view, view_batch

log = logging.getLogger(__name__)

# 2: the preprocessing contract (stage1 + each expert's preprocess) replaces cache_size; 3: an expert's entry is
# its name, checkpoint and sha256 only: its description (input contract included) is read from the checkpoint.
# Format 3 cards may also carry demo, training_data and commit (.provenance); a card without them reads as unknown.
CARD_FORMAT = 3


class FileDataset(Dataset):
    """Image files -> each input policy's uint8 (S, S, 3) tensor, through the preprocessing contract:
    decode, stage 1 (``max_side``, face crop), input policy (:mod:`dfpipe.data.preprocess`).

    A file that cannot be decoded gives black images and its error message instead of raising, so
    one bad upload never stops a batch; items are ``(inputs, index, error)`` with ``inputs`` a dict
    ``{policy.key: tensor}`` and ``error == ""`` if OK. ``degrade`` (optional, picklable for worker
    processes) changes the full-size decoded image first, as a re-encode or rescale on the way to us
    would (the evaluation's degraded copies).
    """

    def __init__(self, paths: list[str | Path], stage1: Stage1, policies: Sequence[InputPolicy],
                 degrade: Callable[[np.ndarray], np.ndarray] | None = None):
        self.paths = [str(p) for p in paths]
        self.stage1 = stage1
        self.policies = tuple(dict.fromkeys(policies))
        self.degrade = degrade

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[dict[str, torch.Tensor], int, str]:
        try:
            img = decode_image(self.paths[i], max_pixels=self.stage1.max_pixels, min_side=self.stage1.min_side)
            if self.degrade is not None:
                img = self.degrade(img)
            img = scoring_image(img, self.stage1)
            return {p.key: torch.from_numpy(fit(img, p)) for p in self.policies}, i, ""
        except Exception as exc:  # noqa: BLE001 - any failure becomes a reported row, never a crash
            blank = {p.key: torch.zeros(p.shape, dtype=torch.uint8) for p in self.policies}
            return blank, i, str(exc) or type(exc).__name__


def scoring_workers(requested: int, device: torch.device) -> int:
    """DataLoader workers for scoring: ``requested`` if >= 0; auto (-1) is :func:`num_workers`'s, except on a
    CPU device with at most 2 cores, where decode workers would take the cores the model's own threads
    use (measured on 2 cores, ``bench/bench_predict.py``: 78% of the model-only throughput with one worker,
    above 90% decoding in the main process)."""
    if requested < 0 and device.type == "cpu" and (os.cpu_count() or 1) <= 2:
        return 0
    return num_workers(requested)


def scoring_policy(policy: InputPolicy, crops: int) -> InputPolicy:
    """The policy an expert trained with ``policy`` is scored through for a view of ``crops`` crops: a grid of
    them for a crop mode; a ``resize`` expert's single whole image otherwise (its N crops would be N copies)."""
    return policy if crops == 1 or policy.mode == "resize" else replace(policy, crops=crops)


ViewGroup = tuple[InputPolicy, int, list[View]]  # the views of one expert that share its policy and input size


def view_groups(views: list[View], policies: dict[int, InputPolicy], img_size: int) -> list[ViewGroup]:
    """An expert's views grouped by (its policy for their crops count, their model input size), in view order:
    each group is one normalised input and one forward pass per batch."""
    groups: dict[tuple[InputPolicy, int], list[View]] = {}
    for v in views:
        groups.setdefault((policies[v.crops], v.size(img_size)), []).append(v)
    return [(policy, size, vs) for (policy, size), vs in groups.items()]


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
        self.preps: list[Preprocess] = [e.preprocess for e in experts]
        stage1s = {p.stage1 for p in self.preps}
        if len(stage1s) > 1:
            raise ConfigError(f"experts were trained on images prepared differently (stage 1: {sorted(map(str, stage1s))}): "
                              "an ensemble takes one stage-1 image per input")
        self.experts, self.tta, self.combine, self.device = experts, list(tta), combine, device
        self.stage1: Stage1 = stage1s.pop()
        # per expert, the input policy of each crops count its views use (crops<N> views: a grid of N crops)
        self.inputs: list[dict[int, InputPolicy]] = [{v.crops: scoring_policy(p.input.policy, v.crops) for v in self.views}
                                                     for p in self.preps]
        self.policies: list[InputPolicy] = list(dict.fromkeys(q for d in self.inputs for q in d.values()))
        # resolved once, not per batch: the sizes depend only on the views and each expert's model
        self.groups: list[list[ViewGroup]] = [view_groups(self.views, pols, e.model.img_size)
                                              for e, pols in zip(experts, self.inputs)]
        self.stack, self.thresholds = stack, thresholds

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.experts]

    @classmethod
    def load(cls, models_dir: str | Path, names: list[str], tta: list[str], combine: str,
             device: torch.device | None = None, stack: dict | None = None) -> "Ensemble":
        device = device or pick_device()
        if not names:
            raise ConfigError("ensemble_predict.experts is empty: list the experts to ensemble")
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
            raise DataError(f"{card_path}: ensemble card format {card.get('format')!r}; this version reads format "
                            f"{CARD_FORMAT}: rerun stage 5 (dvc repro ensemble_predict)")
        ens = cls.load(models_dir, [e["name"] for e in card["experts"]], card["tta"], card["combine"],
                       device, stack=card.get("stack"))
        for e, want in zip(ens.experts, card["experts"]):
            if want.get("sha256") and e.sha256 != want["sha256"]:
                raise DataError(f"{models_dir}/{e.name}/best.pt is not the checkpoint {card_path} was made "
                                 "with (retrained?): rerun stage 5 (dvc repro ensemble_predict)")
        ens.thresholds = card["thresholds"]
        return ens

    def card(self, thresholds: dict, extra: dict | None = None) -> dict:
        """Everything a CLI/API needs to score and give verdicts as stage 5 did (JSON-serialisable).

        An expert is named by its checkpoint and that file's sha256: its description and input contract are read
        from the checkpoint (stored there once), and the hash refuses a retrained one. ``stage1`` is the experts'
        common record, for the reader (loading reads each checkpoint's)."""
        return {"format": CARD_FORMAT, "stage1": asdict(self.stage1), "tta": self.tta, "combine": self.combine,
                "stack": self.stack, "thresholds": thresholds,
                "experts": [{"name": e.name, "checkpoint": f"{e.name}/best.pt", "sha256": e.sha256}
                            for e in self.experts],
                **(extra or {})}

    # -- scoring
    def _expert_probs(self, m: torch.nn.Module, xs: dict[str, torch.Tensor], groups: list[ViewGroup],
                      inputs: dict) -> torch.Tensor:
        """(B,) probability of one expert, averaged over the views (a crops<N> view: over its N crops first).
        ``xs``: the uint8 batches by policy key, (B, S, S, 3), or (B, N, S, S, 3) for a grid of crops;
        ``groups``: the expert's :func:`view_groups`; ``inputs`` caches the normalised batches by (key, size,
        mean, std) so experts that share them compute them once."""
        probs = []
        for policy, size, views in groups:
            ck = (policy.key, size, tuple(m.mean), tuple(m.std))
            if ck not in inputs:
                x = xs[policy.key]
                x = x.flatten(0, 1) if x.dim() == 5 else x  # (B N, S, S, 3): crop n of image b at row b N + n
                inputs[ck] = to_model_input(x, size, m.mean, m.std, channels_last=True)
            batch = view_batch(views, inputs[ck]).contiguous(memory_format=torch.channels_last)
            with autocast(self.device):
                p = m(batch)["prob"].float()  # (V B N,)
            probs.append(p.view(len(views), -1, policy.crops).mean(2))  # (V, B)
        return torch.cat(probs).mean(0)

    @torch.inference_mode()
    def score_batch(self, xs: dict[str, torch.Tensor]) -> np.ndarray:
        """``{policy key: uint8 (B, S, S, 3) or (B, N, S, S, 3)}`` (one entry per policy of :attr:`policies`, e.g.
        from :class:`FileDataset` or :class:`dfpipe.data.dataset.StoreDataset`) -> (E, B) per-expert
        probabilities, averaged over TTA views."""
        on_device = {p.key: xs[p.key].to(self.device, non_blocking=True) for p in self.policies}
        inputs: dict = {}
        return np.stack([self._expert_probs(e.model, on_device, groups, inputs).cpu().numpy()
                         for e, groups in zip(self.experts, self.groups)])

    def score_loader(self, loader: DataLoader, desc: str = "score") -> np.ndarray:
        """(E, N) per-expert probabilities over a loader of ``({key: uint8 batch}, ...)`` items (order kept)."""
        parts = [self.score_batch(batch[0]) for batch in tqdm(loader, desc=desc, unit="batch")]
        return np.concatenate(parts, axis=1) if parts else np.zeros((len(self.experts), 0))

    def score_pool(self, pool: pd.DataFrame, batch_size: int, desc: str = "score") -> np.ndarray:
        """(E, N) per-expert probabilities of a pool's stored stage-1 images (columns ``cache_path``,
        ``cache_index``, ``label``), cut to every input policy and decoded in DataLoader workers (stage 5's path)."""
        loader = DataLoader(StoreDataset(pool, self.policies), batch_size=batch_size, shuffle=False,
                            num_workers=scoring_workers(-1, self.device), pin_memory=self.device.type == "cuda")
        return self.score_loader(loader, desc)

    def combine_experts(self, per_expert: np.ndarray) -> np.ndarray:
        return combine_scores(per_expert, self.combine, self.stack)

    def stage1_image(self, img: np.ndarray) -> np.ndarray:
        """A decoded image's stage-1 image under this ensemble's contract (``max_side``, face crop)."""
        return scoring_image(img, self.stage1)

    def fit_inputs(self, s1: np.ndarray) -> dict[str, np.ndarray]:
        """A stage-1 image -> each input policy's uint8 array (what :meth:`score_inputs` stacks): the full-size
        image is no longer needed after this (the server keeps only these)."""
        return {p.key: fit(s1, p) for p in self.policies}

    def score_inputs(self, items: list[dict[str, np.ndarray]]) -> np.ndarray:
        """Ensemble scores (N,) of :meth:`fit_inputs` outputs: stacked per policy, scored, combined."""
        if not items:
            return np.zeros(0)
        xs = {p.key: torch.from_numpy(np.stack([it[p.key] for it in items])) for p in self.policies}
        return self.combine_experts(self.score_batch(xs))

    def score_prepared(self, images: list[np.ndarray]) -> np.ndarray:
        """Ensemble scores (N,) of stage-1 images (already through :meth:`stage1_image`), any sizes."""
        return self.score_inputs([self.fit_inputs(im) for im in images])

    def score_images(self, images: list[np.ndarray]) -> np.ndarray:
        """Ensemble scores (N,) of decoded uint8 RGB images of any size: the same steps as files and stage 5
        (stage 1, then each expert's input policy)."""
        return self.score_prepared([self.stage1_image(im) for im in images])

    def score_files(self, paths: list[str | Path], batch_size: int = 64, workers: int = -1,
                    degrade: Callable[[np.ndarray], np.ndarray] | None = None,
                    decode: Literal["workers", "device"] = "workers",
                    progress: Callable[[int], object] | None = None,
                    ) -> tuple[np.ndarray, list[tuple[str, str]]]:
        """Ensemble scores (N,) of image files, decoded in ``workers`` DataLoader processes (-1 = auto).

        A file that fails to decode scores NaN (the caller picks a fallback) and is listed in the
        returned ``[(path, error)]``. ``degrade`` is passed to :class:`FileDataset`. ``progress(n)`` is called after
        each batch with the number of files it settled (a progress bar's ``update``).

        ``decode="device"`` (opt-in) has the workers only read the files and decodes the JPEGs that allow
        it on ``self.device`` (nvJPEG on CUDA), resizing there too (:mod:`dfpipe.ensemble_predict.gpu_decode`);
        other files, and every file of a face-crop ensemble or under ``degrade``, go through the workers
        path. Its pixels may differ from the contract's by decoder (IDCT, chroma upsampling) and resize
        filter rounding, hence opt-in: see that module for the measured differences.
        """
        if decode not in DECODE_MODES:
            raise ConfigError(f"decode {decode!r}: choose one of {list(DECODE_MODES)}")
        ds = FileDataset(paths, self.stage1, self.policies, degrade=degrade)
        if decode == "device" and (why := device_refusal(self.stage1, degrade)):
            log.warning("decode='device': decoding in the DataLoader workers instead: %s", why)
            decode = "workers"
        batches = (device_batches(ds, self.device, batch_size, workers) if decode == "device"
                   else self._worker_batches(ds, batch_size, workers))
        per_expert = np.full((len(self.experts), len(ds)), np.nan)
        errors: list[tuple[str, str]] = []
        for idx, x, err in batches:
            errors += [(ds.paths[i], e) for i, e in err]
            if len(idx):
                per_expert[:, idx] = self.score_batch(x)
            if progress is not None:
                progress(len(idx) + len(err))
        scores = np.full(len(ds), np.nan)
        good = ~np.isnan(per_expert[0])
        if good.any():
            scores[good] = self.combine_experts(per_expert[:, good])
        return scores, errors

    def _worker_batches(self, ds: FileDataset, batch_size: int, workers: int,
                        ) -> Iterator[tuple[np.ndarray, dict[str, torch.Tensor], list[tuple[int, str]]]]:
        """``(indices, {policy key: uint8 batch}, [(index, error)])`` per batch, all decoded in the workers."""
        loader = DataLoader(ds, batch_size=batch_size, shuffle=False,
                            num_workers=scoring_workers(workers, self.device), pin_memory=self.device.type == "cuda")
        for x, idx, err in loader:
            ok = np.array([e == "" for e in err])
            keep = torch.from_numpy(ok)
            yield idx.numpy()[ok], {k: v[keep] for k, v in x.items()}, [(int(i), e) for i, e in zip(idx, err) if e]

    def verdict(self, score: float) -> str:
        if self.thresholds is None:
            raise ValueError("no thresholds: load the ensemble with Ensemble.from_card")
        return verdict(score, self.thresholds)
