"""The submission: one row per listed test image, checked against the test list before it is written."""

from __future__ import annotations

import numpy as np
import pandas as pd


def build_submission(test_manifest: pd.DataFrame, scores: np.ndarray, fallback: float) -> pd.DataFrame:
    """One row per test image (sorted by name); images that failed to decode get ``fallback``."""
    sub = test_manifest[["img_name", "cache_index"]].copy()
    sub["y_pred"] = fallback
    ok = sub.cache_index.to_numpy() >= 0
    if ok.sum() != len(scores):
        raise ValueError(f"{len(scores)} scores for {int(ok.sum())} decodable test images")
    sub.loc[ok, "y_pred"] = scores
    sub = sub.sort_values("img_name", kind="stable")[["img_name", "y_pred"]].reset_index(drop=True)
    check_submission(sub, test_manifest.img_name)
    return sub


def check_submission(sub: pd.DataFrame, expected_names: pd.Series) -> None:
    """Refuse a submission whose names differ from the test list or whose scores are not in [0, 1]."""
    if list(sub.columns) != ["img_name", "y_pred"]:
        raise ValueError(f"submission columns {list(sub.columns)}; expected ['img_name', 'y_pred']")
    if sub.img_name.duplicated().any():
        raise ValueError(f"duplicate names in submission, e.g. {sub.img_name[sub.img_name.duplicated()].iloc[0]}")
    expected = set(expected_names)
    got = set(sub.img_name)
    if got != expected:
        raise ValueError(f"submission names differ from the test list: {len(expected - got)} missing "
                         f"(e.g. {sorted(expected - got)[:3]}), {len(got - expected)} unexpected")
    y = sub.y_pred.to_numpy(dtype=np.float64)
    if not (np.isfinite(y).all() and (y >= 0).all() and (y <= 1).all()):
        raise ValueError("submission scores must be finite and in [0, 1]")
