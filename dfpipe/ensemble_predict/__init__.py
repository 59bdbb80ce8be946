"""Load the experts and score images: the ONE scoring path of the submission (and later CLI/API).

Every image goes through the one preprocessing contract (:mod:`dfpipe.data.preprocess`), read from
the experts' checkpoints: images of the stage-1 store are stage-1 images already; any other image (a
file given to the CLI or API, :meth:`Ensemble.score_files`) is decoded and made into its stage-1 image
exactly as stage 1 does (``max_side``, face crop: :class:`FileDataset`), so every path sees the same
pixels. Each image is cut once per distinct input policy of the experts (in the DataLoader workers);
each expert then normalises its batch on the device (:func:`to_model_input`, shared by experts with the
same policy and normalisation), runs every TTA view (:mod:`.tta`) and averages its probabilities over
the views; experts are combined over the whole set (:func:`combine_scores`).

Modules, by job: :mod:`.experts` (checkpoint -> inference model, BatchNorm folded), :mod:`.tta` (views),
:mod:`.combine` (mean / rank / stacking), :mod:`.ensemble` (:class:`Ensemble`, :class:`FileDataset`),
:mod:`.submission`, :mod:`.reports` (metrics by cluster / method, ROC plot), :mod:`.pipeline` (stage 5,
:func:`run`).
"""

from ..metrics import verdict
from .combine import COMBINE, combine_scores, fit_stacking
from .ensemble import CARD_FORMAT, Ensemble, FileDataset
from .experts import LoadedExpert, fold_batchnorm, load_expert
from .pipeline import run
from .reports import by_cluster, by_method
from .roc_plot import plot_roc
from .submission import build_submission, check_submission
from .tta import GEOMETRIC, TTA_VIEWS, View, parse_view

__all__ = ["CARD_FORMAT", "COMBINE", "Ensemble", "FileDataset", "GEOMETRIC", "LoadedExpert", "TTA_VIEWS", "View",
           "build_submission", "by_cluster", "by_method", "check_submission", "combine_scores", "fit_stacking",
           "fold_batchnorm", "load_expert", "parse_view", "plot_roc", "run", "verdict"]
