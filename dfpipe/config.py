"""Typed, frozen settings per stage, read from one section of ``params.yaml``.

Each stage reads only its own section. Unknown keys are rejected with a message that names the
section and the key, so a typo in ``params.yaml`` or in ``dvc exp run -S`` never passes silently.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml

from .errors import ConfigError, did_you_mean  # noqa: F401  (ConfigError: re-exported, it lived here)
from .registry import EDITING_METHODS, EXPERTS, FACE_DETECTORS, LANDMARKERS, RECONSTRUCTION_METHODS, Registry

T = TypeVar("T")


@dataclass(frozen=True)
class RegistryChoice:
    """Marks a ``str`` setting whose value must be a name of ``registry`` (or ``"none"`` when ``none``): the
    choices are read from the registry when params load, so registering a new entry makes it selectable."""

    registry: Registry
    none: bool = False  # "none" (off) is a valid value too

    def choices(self) -> list[str]:
        return ["none", *self.registry.names()] if self.none else self.registry.names()


# Choices, declared once. A Literal's: the stage modules derive their tuples from it (typing.get_args). A
# RegistryChoice's: the names registered in a dfpipe.registry registry, read when params load.
FaceCrop = Annotated[str, RegistryChoice(FACE_DETECTORS, none=True)]  # dfpipe.data.faces
FacePolicy = Literal["whole", "largest", "skip"]
Landmarker = Annotated[str, RegistryChoice(LANDMARKERS, none=True)]  # dfpipe.data.landmarks
EditingMethod = Annotated[str, RegistryChoice(EDITING_METHODS)]  # dfpipe.augment_sd.editing
ReconstructMethod = Annotated[str, RegistryChoice(RECONSTRUCTION_METHODS)]  # dfpipe.augment_sd.reconstruct
ExpertArch = Annotated[str, RegistryChoice(EXPERTS)]  # dfpipe.models
DiffusionMode = Literal["img2img", "inpaint"]
DiffusionDtype = Literal["auto", "float32", "float16", "bfloat16"]
ReconstructDtype = Literal["auto", "float32", "bfloat16"]
Embedder = Literal["pretrained", "finetune"]
KMeansBackend = Literal["auto", "sklearn", "torch"]
AugmentPreset = Literal["none", "light", "strong", "randaugment", "blur_jpeg", "light_blur_jpeg", "safe",
                        "safe_post"]
Combine = Literal["mean_prob", "mean_logit", "rank", "stack"]
InputMode = Literal["resize", "resize_short_crop", "crop"]  # see dfpipe.data.preprocess
LrScale = Literal["sqrt", "linear", "none"]
InfoMI = Literal["kl", "wasserstein"]  # the divergence behind the LIL / GIL terms: dfpipe.losses.info_divergence


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert ``value`` (from YAML) to the annotated type ``tp``; raise ConfigError on mismatch."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Annotated:
        choice = next((m for m in tp.__metadata__ if isinstance(m, RegistryChoice)), None)
        value = _coerce(value, args[0], where)
        if choice is None or (choice.none and value == "none"):  # "none" (off) needs no registry loaded
            return value
        if value not in (allowed := choice.choices()):
            raise ConfigError(f"{where}: {value!r} is not allowed; choose one of {allowed}{did_you_mean(value, allowed)}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError("; ".join(errors))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        key_tp, val_tp = args if len(args) == 2 else (Any, Any)
        keys = [str(k) if key_tp in (str, Any) else _coerce(k, key_tp, where) for k in value]
        return {k: _coerce(v, val_tp, f"{where}.{k}") for k, v in zip(keys, value.values())}
    if tp is Any:
        return value
    if origin is Literal:
        if isinstance(value, str) and value in args:
            return value
        raise ConfigError(f"{where}: {value!r} is not allowed; choose one of {list(args)}"
                          f"{did_you_mean(value, args)}")
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is bool and isinstance(value, bool):
        return value
    if tp is str and isinstance(value, str):
        return value
    raise ConfigError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def from_dict(cls: type[T], data: dict[str, Any], where: str) -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError."""
    hints = typing.get_type_hints(cls, include_extras=True)  # extras: the RegistryChoice markers
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        if len(unknown) == 1:
            hints = did_you_mean(unknown[0], names)
        else:
            hints = "".join(did_you_mean(k, names, f" ({k!r}: did you mean {{}}?)") for k in unknown)
        raise ConfigError(f"{where}: unknown key(s) {unknown}{hints}; allowed: {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required key is missing
        raise ConfigError(f"{where}: {exc}") from None


def read_params(params_path: str | Path = "params.yaml") -> dict[str, Any]:
    """The whole params file as a mapping (a clear error when it is missing)."""
    path = Path(params_path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    with path.open(encoding="utf-8") as fh:
        return yaml.safe_load(fh) or {}


def load_section(cls: type[T], section: str, params_path: str | Path = "params.yaml") -> T:
    """Read ``section`` of ``params_path`` into ``cls`` (a frozen dataclass)."""
    params = read_params(params_path)
    if section not in params:
        raise ConfigError(f"{params_path}: no section '{section}'")
    return from_dict(cls, params[section] or {}, f"{params_path}:{section}")


# --------------------------------------------------------------------------- stage 1
@dataclass(frozen=True)
class DatasetConfig:
    """One input of stage 1: an image folder feeding one split (paths relative to ``data_root``)."""

    name: str  # unique; prefixes img_name ("<name>/<img_name>") when several datasets feed one split
    split: str  # train | val | test
    images: str  # image folder; img_name is a path relative to it
    labels: str = ""  # train/val: label CSV img_name,target; test: a name list (*_nolabel.txt) or "" = all images


@dataclass(frozen=True)
class PrepareConfig:
    """Stage 1 (its files: :class:`dfpipe.layout.Layout`; dataset paths are relative to ``data_root``)."""

    max_side: int = 0  # stored images: longer side above this is downscaled (aspect kept); 0 = native resolution
    min_side: int = 16  # images with a smaller side are skipped as junk
    max_pixels: int = 100_000_000  # decompression-bomb guard
    workers: int = 0  # 0 = all cores
    limit: int = 0  # >0: only the first N images of each dataset (smoke runs)
    dup_max_distance: int = 4  # pHash (64-bit) Hamming distance <= this = near duplicate
    face_crop: FaceCrop = "none"  # none | haar: crop each image to its (largest) face before caching
    face_margin: float = 1.3  # square crop side = margin * max(face w, h)
    face_policy: FacePolicy = "whole"  # image with no face: whole (keep it uncropped) | largest (same) | skip
    datasets: list[DatasetConfig] = field(default_factory=list)  # [] = the layout's train/val/test entries
    chunk_size: int = 1024  # images per resumable unit of work (committed to <prepared>.work/)

    def __post_init__(self) -> None:
        # checked when the settings are made (params load, -S overrides, code), not after stage 1 has begun:
        # the stage then takes them as they are
        if self.face_crop != "none" and self.face_crop not in FACE_DETECTORS:
            names = FACE_DETECTORS.names()
            raise ConfigError(f"prepare_data.face_crop={self.face_crop!r}: choose one of {['none', *names]}"
                              f"{did_you_mean(self.face_crop, names)}")
        if self.face_policy not in typing.get_args(FacePolicy):
            raise ConfigError(f"prepare_data.face_policy={self.face_policy!r}: choose one of "
                              f"{list(typing.get_args(FacePolicy))}")
        if self.face_margin < 1.0:
            raise ConfigError(f"prepare_data.face_margin={self.face_margin}: must be >= 1.0 (1.0 = the detector's box)")
        if not 0 <= self.dup_max_distance <= 64:
            raise ConfigError(f"prepare_data.dup_max_distance={self.dup_max_distance}: must be in [0, 64]")
        if self.chunk_size < 1 or self.max_side < 0 or self.workers < 0:
            raise ConfigError(f"prepare_data: chunk_size ({self.chunk_size}) must be >= 1, max_side ({self.max_side}) "
                              f"and workers ({self.workers}) >= 0")


# --------------------------------------------------------------------------- stage 2
@dataclass(frozen=True)
class DiffusionConfig:
    model: str = ""  # local diffusers folder or hub id; empty = skip
    mode: DiffusionMode = "img2img"  # img2img | inpaint
    prompt: str = "a photo of a person's face, high quality"
    negative_prompt: str = ""
    strength: float = 0.5
    guidance_scale: float = 5.0
    steps: int = 20
    batch_size: int = 4
    dtype: DiffusionDtype = "auto"  # auto | float32 | float16 | bfloat16
    per_image: int = 1  # diffusion fakes per selected real image
    fraction: float = 0.25  # share of real training images that get diffusion fakes


@dataclass(frozen=True)
class ReconstructConfig:
    """Reconstruction fakes: reals passed through an autoencoder (dfpipe.augment_sd.reconstruct), each pair
    (real, reconstruction) with one compression and resize history."""

    per_real: float = 0.0  # reconstructions per real image (expected count); 0 = off
    methods: dict[ReconstructMethod, float] = field(
        default_factory=lambda: {"taef2": 1.0, "random_ae": 1.0, "vae": 0.0}
    )  # method -> sampling weight: taef2 (shipped FLUX.2 tiny AE) | random_ae (trained here) | vae (vae_model)
    vae_model: str = ""  # `vae`: a local diffusers AutoencoderKL / AutoencoderTiny folder, or upstream TAESD .pth pair
    batch_size: int = 1  # images per model call (same-size images batch together): 1 is fastest on CPU, raise on GPU
    # model arithmetic: auto = bfloat16 where the device computes it natively (CUDA, CPUs with AVX512-BF16 / AMX:
    # 2-3x faster for taef2, within 1/255 of float32), else float32
    dtype: ReconstructDtype = "auto"
    max_side: int = 1024  # a larger real is downscaled first (its pair's real image is that copy); 0 = no limit
    clean_share: float = 0.5  # pairs left with the real's own history only (the traces stay learnable)
    resize_prob: float = 0.3  # processed pairs: chance of a downscale (both images)
    resize_range: tuple[float, float] = (0.5, 0.9)  # its factor
    webp_share: float = 0.25  # processed pairs: WebP instead of JPEG as the last step (both images)
    jpeg_quality: tuple[int, int] = (65, 100)
    webp_quality: tuple[int, int] = (60, 100)
    ae_models: int = 4  # random_ae: autoencoders, each with its own drawn decoder
    ae_steps: int = 200  # random_ae: training steps of each (Adam, L1 on crops of the reals)
    ae_crop: int = 48  # random_ae: training crop side
    ae_batch: int = 8  # random_ae: crops per step
    ae_train_images: int = 256  # random_ae: reals sampled to cut training crops from (8 crops each)


@dataclass(frozen=True)
class AugmentConfig:
    seed: int = 42
    fakes_per_real: float = 1.0  # editing fakes made per real training image (expected count)
    methods: dict[EditingMethod, float] = field(
        default_factory=lambda: {"self_blend": 1.0, "splice": 1.0, "copy_move": 0.0, "inpaint": 0.0,
                                 "upsample": 0.0, "jpeg_double": 0.0}
    )  # method name -> sampling weight (0 = off)
    real_widening: float = 0.0  # share of real images that get a widened (compressed/resized) copy
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    contact_sheet_per_method: int = 4
    # self_blend's mask: none = a random face-shaped region | mediapipe = the hull of MediaPipe Face Mesh's
    # landmarks (SBI), the random region where no face is found (dfpipe.data.landmarks)
    landmarks: Landmarker = "none"
    workers: int = 0  # editing fakes: processes (0 = all cores, 1 = in-process); same bytes either way
    reconstruct: ReconstructConfig = field(default_factory=ReconstructConfig)  # off by default (per_real 0)


# --------------------------------------------------------------------------- stage 3
@dataclass(frozen=True)
class SplitConfig:
    embedder: Embedder = "pretrained"  # pretrained: backbone as `pretrained` gives it | finetune: first trained on labels
    backbone: str = "tf_efficientnet_lite0"
    pretrained: str = "bundled"  # bundled | timm | none | path to a checkpoint file
    img_size: int = 128  # embedding (and fine-tune) input side
    batch_size: int = 64
    finetune_epochs: int = 3  # embedder finetune: epochs on the train-origin originals
    finetune_lr: float = 3e-4
    finetune_batch_size: int = 32
    kmeans_backend: KMeansBackend = "auto"  # auto (torch on CUDA, else sklearn) | sklearn | torch
    minibatch_above: int = 100_000  # sklearn: more rows than this -> chunked MiniBatchKMeans.partial_fit
    n_clusters: int = 12  # 0 = choose k by silhouette score among k_candidates
    k_candidates: tuple[int, ...] = (4, 6, 8, 12, 16)
    silhouette_sample: int = 2000  # silhouette on this many sampled points (0 = all)
    per_class: bool = False  # True: k-means real and fake separately
    n_folds: int = 5  # whole clusters packed largest first: each fold ~1/n_folds of each class
    val_fold: int = 0  # a splice whose donor and source straddle this fold is left out of the split
    seed: int = 42
    contact_sheet_per_cluster: int = 6


# --------------------------------------------------------------------------- stage 4
@dataclass(frozen=True)
class LossWeights:
    ce: float = 1.0
    kl: float = 0.0  # the winners' 0.5 lost on unseen sources (docs/benchmark.md)
    nce: float = 0.0  # the winners' 0.1 lost on unseen sources
    lil: float = 0.0  # local information loss (Ba et al. 2024): needs info_heads >= 2; 0 = off
    gil: float = 0.0  # global information loss (Ba et al. 2024): needs info_heads >= 2; 0 = off


@dataclass(frozen=True)
class ExpertConfig:
    arch: ExpertArch = "timm"  # an Expert registered in dfpipe.models.EXPERTS: timm | npr
    backbone: str = "tf_efficientnet_lite0"
    pretrained: str = "bundled"  # bundled | timm | none | path to a checkpoint file
    # true: a probe on frozen features (UnivFD, Ojha et al. 2023): the backbone keeps its pretrained weights and
    # BN statistics (eval mode, no gradient, out of the optimizer); only what reads its features trains: the
    # classifier, and the projection head / local branches when proj_dim / info_heads are set
    freeze_backbone: bool = False
    img_size: int = 128  # the model's input side (the input policy's size)
    input_mode: InputMode = "resize"  # resize | resize_short_crop | crop (native pixels): dfpipe.data.preprocess
    dropout: float = 0.2  # before the linear head
    proj_dim: int = 0  # >0: the NCE term uses a projection head of this width instead of the pooled features
    info_heads: int = 0  # >=2: that many local branches fused into the classifier's input (dfpipe.models.info); 0 = off
    info_mi: InfoMI = "kl"  # kl | wasserstein: the divergence the lil / gil terms estimate mutual information with
    info_temperature: float = 1.5  # softening of the class distributions inside the lil / gil terms
    mixup: float = 0.0  # >0: mixup of each training batch, mixing weight ~ Beta(mixup, mixup); 0 = off
    epochs: int = 6
    batch_size: int = 32  # per process (per GPU): the global batch is batch_size x the number of processes
    lr: float = 3e-4  # the AdamW lr of a global batch of lr_ref_batch (scaled by lr_scale for another)
    lr_ref_batch: int = 32  # the global batch that lr is tuned for
    lr_scale: LrScale = "sqrt"  # sqrt | linear | none: lr x (global / lr_ref_batch) ** (1/2 | 1 | 0)
    sync_bn: bool = False  # N > 1 GPUs: SyncBatchNorm (BN statistics of the global batch); off on CPU / 1 process
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    temperature: float = 0.1  # InfoNCE temperature
    kl_temperature: float = 2.0  # softening for the EMA-teacher KL term
    ema_epochs: float = 0.0  # EMA time constant in epochs (weights and BN buffers); 0 = off, the model itself
    loss: LossWeights = field(default_factory=LossWeights)
    augment: AugmentPreset = "randaugment"  # see dfpipe.data.transforms
    use_augmented: bool = False  # train on stage-2 fakes too
    # true: an original and the stage-2 images made from it share one global batch (dfpipe.train_experts.sampling
    # PairBatchSampler); needs use_augmented; false = independent shuffling
    pair_batches: bool = False
    seed: int = 0
    deterministic: bool = True  # GPU: deterministic cuDNN / cuBLAS kernels (can be slower); CPU runs always are
    patience: int = 0  # early stopping: stop after this many epochs without a better val AUC (0 = off)
    # arch artifact (dfpipe.models.artifact) only; the off values leave every other expert as it is:
    # a fixed residual front before the backbone: none | dwt (Haar LH/HL/HH, SAFE) | median (x minus the median of
    # its 8 neighbours, FerretNet) | npr (neighbouring pixel relationships): dfpipe.models.residual
    front: Literal["none", "dwt", "median", "npr"] = "none"
    stages: int = 0  # >0: the backbone cut after its first N stages (EfficientNet / MobileNetV2 blocks); 0 = whole
    # (with a front or a cut, arch artifact needs input_mode: crop, native pixels; its builder refuses the others)

    def __post_init__(self) -> None:
        if self.pair_batches and not self.use_augmented:
            raise ConfigError("pair_batches batches each original with the stage-2 images made from it, which train "
                              "only with use_augmented: set use_augmented: true, or pair_batches: false")
        if self.stages < 0:
            raise ConfigError(f"stages must be >= 0 (0 = the whole backbone), got {self.stages}")
        if (self.front != "none" or self.stages) and self.arch != "artifact":
            raise ConfigError(f"front: {self.front!r} and stages: {self.stages} are settings of arch 'artifact' "
                              f"(this expert's arch is {self.arch!r}): set arch: artifact or leave them off")


@dataclass(frozen=True)
class TrainConfig:
    workers: int = -1  # -1 = auto (half the cores, at most 8)
    # the command dvc runs 04_train_experts.py with: "python" (one process) or a DDP launcher such as
    # "accelerate launch --multi_gpu --num_processes 8" or "torchrun --nproc-per-node 8"
    launcher: str = "python"
    experts: dict[str, ExpertConfig] = field(default_factory=dict)  # ExpertConfig's defaults = params' lite0_a


# --------------------------------------------------------------------------- stage 5
@dataclass(frozen=True)
class PredictConfig:
    experts: list[str] = field(default_factory=lambda: ["lite0_a", "lite0_b"])
    per_method: bool = True  # also score stage 2's val-fold generated images: AUC per fake method
    # TTA views: identity, hflip, vflip, rot90, rot180, rot270, scale<f> (input at f x the expert's size),
    # and "+"-joined combinations such as "hflip+scale1.25"
    tta: list[str] = field(default_factory=lambda: ["identity", "hflip"])
    combine: Combine = "mean_prob"  # mean_prob | mean_logit | rank | stack (logistic regression fitted on val)
    stack_folds: int = 5  # stack: val metrics come from cross-validated predictions over these folds
    max_fpr: float = 0.01  # "likely fake" threshold: FPR on val at most this
    max_fnr: float = 0.01  # "likely real" threshold: fakes missed on val at most this
    batch_size: int = 64
    fallback_score: float = 0.5  # score for a test image that could not be decoded


# --------------------------------------------------------------------------- stage 6
@dataclass(frozen=True)
class EvalSetConfig:
    """One labelled set that no training or selection step sees (paths relative to ``data_root``)."""

    name: str  # unique; the key of this set in the metrics JSON, the table and the ROC file names
    images: str  # image folder
    labels: str = ""  # label CSV img_name,target (names relative to images); "" = images/real/* = 0, images/fake/* = 1


@dataclass(frozen=True)
class EvaluateConfig:
    """Stage 6: score held-out labelled sets (and degraded copies) with the ensemble stage 5 wrote."""

    # [] = the data root's test set with its labels (the layout's test_dir, test_labels; skipped with a warning
    # while the labels are not there)
    sets: list[EvalSetConfig] = field(default_factory=list)
    # each set is also scored under these (identity always): jpeg<q>, half (downscale to 1/2), blur<sigma>
    degradations: list[str] = field(default_factory=lambda: ["jpeg75", "jpeg50", "half", "blur1"])
    bootstrap: int = 1000  # bootstrap resamples for the AUC 95% interval (0 = no interval)
    seed: int = 0  # bootstrap and degradation randomness
    batch_size: int = 64
    workers: int = -1  # decode processes (-1 = auto)


# --------------------------------------------------------------------------- the stages
# One name per stage: script 0N_<name>.py, this params section, package (or module) dfpipe.<name>, DVC stage <name>.
STAGE_CONFIGS: dict[str, type] = {"prepare_data": PrepareConfig, "augment_sd": AugmentConfig,
                                  "cluster_split": SplitConfig, "train_experts": TrainConfig,
                                  "ensemble_predict": PredictConfig, "evaluate": EvaluateConfig}
