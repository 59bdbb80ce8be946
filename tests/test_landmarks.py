"""Face landmarks (dfpipe.data.landmarks) and the self-blended images drawn from them (SBI, stage 2).

The mask tests need no detector: they take the landmarks of a real face photo as an ellipse inscribed in
the box OpenCV's Haar cascade finds on it. Tests of the detector itself skip when mediapipe (installed
by ``make setup``) is missing; the missing-package error is tested either way.
"""

import dataclasses
import json
import sys
import types
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from skimage import data

from conftest import layout_in
from dfpipe.augment_sd import editing, imaging
from dfpipe.augment_sd import run as run_augment
from dfpipe.augment_sd.editing import MASK_GRID, face_hull, landmark_mask, self_blend
from dfpipe.augment_sd.generate import edit_one, regenerate
from dfpipe.config import AugmentConfig, from_dict
from dfpipe.data import landmarks as lmk
from dfpipe.data.faces import HaarDetector
from dfpipe.data.preprocess import Stage1
from dfpipe.data.store import StoreReader, shard_name, write_png_shard, write_store_record
from dfpipe.errors import ConfigError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"  # ../shared/data beside the checkout


def _has_face_mesh() -> bool:
    try:
        from mediapipe.python.solutions import face_mesh  # noqa: F401
    except ImportError:
        return False
    return True


needs_mediapipe = pytest.mark.skipif(not _has_face_mesh(), reason=f"needs {lmk.MEDIAPIPE_PIN} (make setup)")


@pytest.fixture(scope="module")
def astronaut():
    return np.ascontiguousarray(data.astronaut())  # (512, 512, 3) RGB, one frontal face


@pytest.fixture(scope="module")
def face_box(astronaut):
    boxes = HaarDetector().detect(astronaut)
    assert len(boxes) == 1
    return boxes[0]


def ellipse_points(box, n=40):
    """Landmarks stand-in: n points on the ellipse inscribed in a face box grown upwards (forehead)."""
    x, y, w, h = box[:4]
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([x + w / 2 + 0.5 * w * np.cos(t), y + 0.45 * h + 0.6 * h * np.sin(t)], 1).astype(np.float32)


def polygon(shape, pts):
    out = np.zeros(shape, np.uint8)
    cv2.fillPoly(out, [np.round(pts).astype(np.int32)], 1)
    return out.astype(bool)


# --------------------------------------------------------------------------- SBI mask from landmarks
def test_landmark_mask_covers_the_hull_and_changes_nothing_outside(astronaut, face_box):
    pts = ellipse_points(face_box)
    hull = face_hull(pts)
    inside = polygon(astronaut.shape[:2], hull)
    x, y, w, h = cv2.boundingRect(hull)
    grown = np.zeros_like(inside)
    gx, gy = int(0.25 * w), int(0.25 * h)  # erosion/blur, elastic warp and the <= 3 % affine shift
    grown[max(0, y - gy):y + h + gy, max(0, x - gx):x + w + gx] = True
    for seed in range(12):
        fake, mask, params = self_blend(astronaut, np.random.default_rng(seed), landmarks=pts)
        assert params["mask"]["shape"] == "landmark_hull"
        assert params["mask"]["hull"] == hull.tolist()
        json.dumps(params)
        covered = (mask[inside] > 0).mean()
        assert covered > 0.7, f"seed {seed}: the mask covers {covered:.0%} of the hull"
        assert not (mask[~grown] > 0).any(), f"seed {seed}: mask reaches far outside the hull"
        np.testing.assert_array_equal(fake[mask == 0], astronaut[mask == 0])
        core = mask >= 0.99 * mask.max()
        assert np.abs(fake[core].astype(int) - astronaut[core]).mean() > 1.0  # the face did change
        assert mask.max() == pytest.approx(params["blend_ratio"], abs=1 / 255)
        assert imaging.quantise_mask(mask).tobytes() == mask.tobytes()  # survives the 8-bit PNG
        n_blobs = cv2.connectedComponents((mask > 0).astype(np.uint8))[0] - 1
        assert n_blobs == 1


def test_self_blend_with_landmarks_is_a_function_of_its_seed(astronaut, face_box):
    pts = ellipse_points(face_box)
    a = self_blend(astronaut, np.random.default_rng(5), landmarks=pts)
    b = self_blend(astronaut, np.random.default_rng(5), landmarks=pts.copy())
    c = self_blend(astronaut, np.random.default_rng(6), landmarks=pts)
    assert a[0].tobytes() == b[0].tobytes() and a[1].tobytes() == b[1].tobytes() and a[2] == b[2]
    assert a[1].tobytes() != c[1].tobytes()


def test_the_recorded_hull_replays_the_same_fake(astronaut, face_box):
    """regenerate passes the hull a row recorded instead of the landmarks: same bytes, no detector."""
    pts = ellipse_points(face_box, n=200)
    hull = face_hull(pts)
    np.testing.assert_array_equal(face_hull(hull), hull)  # the hull of a hull is itself
    for seed in range(4):
        fake, mask, params = self_blend(astronaut, np.random.default_rng(seed), landmarks=pts)
        again = self_blend(astronaut, np.random.default_rng(seed), landmarks=np.asarray(params["mask"]["hull"]))
        assert fake.tobytes() == again[0].tobytes() and mask.tobytes() == again[1].tobytes()


def test_no_or_unusable_landmarks_fall_back_to_the_random_face_region(astronaut):
    rng = np.random.default_rng
    fake, mask, p = self_blend(astronaut, rng(1), landmarks=None)
    assert p["mask"]["shape"] == "face_ellipse" and "landmarks" not in p["mask"]
    ref = self_blend(astronaut, rng(1))  # the same as before landmarks existed
    assert fake.tobytes() == ref[0].tobytes() and p == ref[2]
    line = np.array([[10, 10], [50, 50], [90, 90]], np.float32)  # collinear: no area
    for pts in (line, line[:2], np.full((5, 2), np.nan, np.float32)):
        _, _, p = self_blend(astronaut, rng(1), landmarks=pts)
        assert p["mask"]["shape"] == "face_ellipse" and p["mask"]["landmarks"] == "unusable"
    off = np.array([[900, 900], [1000, 900], [950, 1000]], np.float32)  # off the image
    fake, mask, p = self_blend(astronaut, rng(2), landmarks=off)
    assert p["mask"]["shape"] == "face_ellipse" and p["mask"]["hull"]
    np.testing.assert_array_equal(fake[mask == 0], astronaut[mask == 0])
    again = self_blend(astronaut, rng(2), landmarks=np.asarray(p["mask"]["hull"]))
    assert fake.tobytes() == again[0].tobytes()


def test_a_face_cut_by_the_border_is_blended_up_to_the_border(astronaut, face_box):
    x, y, w, h = face_box[:4]
    pts = ellipse_points((512 - w // 2, y, w, h))  # the face's right half is beyond the image
    for seed in range(6):
        mask, p = landmark_mask(512, 512, face_hull(pts), np.random.default_rng(seed))
        rows = mask[:, -1] > 0
        assert rows.any(), "the border does not erode the face"
        # no stub: along the border the mask spans about the hull's own height there
        assert rows.sum() > 0.5 * h


def test_landmark_mask_work_follows_the_face_not_the_image(monkeypatch):
    """A 2048x1536 image with a 1000 px face: the erosion, blur and elastic warp run on a face grid of at
    most MASK_GRID pixels (bench: well under 10 ms)."""
    calls = []
    blur, remap = cv2.GaussianBlur, cv2.remap

    def rec(fn):
        def wrapped(x, *a, **k):
            calls.append(x.shape[:2])
            return fn(x, *a, **k)
        return wrapped

    monkeypatch.setattr(editing.cv2, "GaussianBlur", rec(blur))
    monkeypatch.setattr(editing.cv2, "remap", rec(remap))
    pts = ellipse_points((500, 200, 900, 1000))
    for seed in range(5):
        calls.clear()
        mask, _ = landmark_mask(1536, 2048, face_hull(pts), np.random.default_rng(seed))
        assert mask.shape == (1536, 2048) and 0.1 < (mask > 0).mean() < 0.5
        assert calls and all(max(s) <= MASK_GRID for s in calls), calls


# --------------------------------------------------------------------------- configuration and errors
def test_config_choice_and_missing_package_error(monkeypatch, tmp_path):
    assert lmk.LANDMARKERS.names() == ["mediapipe"]  # the config adds "none"
    with pytest.raises(ConfigError, match=r"choose one of \['none', 'mediapipe'\] \(did you mean 'mediapipe'\?\)"):
        from_dict(AugmentConfig, {"landmarks": "mediapip"}, "params.yaml:augment_sd")
    lmk.check_landmarker("none")
    with pytest.raises(ConfigError, match="choose one of"):
        lmk.check_landmarker("dlib")
    lmk.LANDMARKERS.clear_cache()
    monkeypatch.setitem(sys.modules, "mediapipe", None)  # `import mediapipe` fails as when not installed
    try:
        with pytest.raises(ConfigError, match=r"augment_sd\.landmarks: mediapipe: the package 'mediapipe' is not "
                                              r"installed.*--no-deps mediapipe==0.10.21.*set augment_sd\.landmarks"):
            lmk.check_landmarker("mediapipe")
        with pytest.raises(ConfigError, match="not installed"):
            lmk.face_landmarks(np.zeros((64, 64, 3), np.uint8), "mediapipe")
        # the stage refuses before writing anything
        out = tmp_path / "aug"
        with pytest.raises(ConfigError, match="mediapipe"):
            run_augment(AugmentConfig(landmarks="mediapipe", workers=1),
                        layout_in(tmp_path, prepared=make_store(tmp_path / "prep", [data.astronaut()]), augmented=out))
        assert not out.exists()
        # a release without the legacy solutions (0.10.30 and later)
        newer = types.ModuleType("mediapipe")
        newer.__version__ = "1.2.3"
        monkeypatch.setitem(sys.modules, "mediapipe", newer)
        for name in ["mediapipe.python", *(m for m in list(sys.modules) if m.startswith("mediapipe.python."))]:
            monkeypatch.setitem(sys.modules, name, None)
        with pytest.raises(ConfigError, match=r"mediapipe 1.2.3 has no Face Mesh.*mediapipe==0.10.21"):
            lmk.check_landmarker("mediapipe")
    finally:
        lmk.LANDMARKERS.clear_cache()


def test_a_registered_landmarker_is_selectable_and_built_once():
    class Fixed:  # five points, wherever the face is
        def detect(self, img):
            return np.array([[1, 2], [3, 4], [5, 6], [7, 8], [9, 10]], np.float32)

    lmk.register_landmarker("fixed", Fixed)
    try:
        assert from_dict(AugmentConfig, {"landmarks": "fixed"}, "a").landmarks == "fixed"
        lmk.check_landmarker("fixed")
        pts = lmk.face_landmarks_batch([np.zeros((8, 8, 3), np.uint8)] * 2, "fixed")
        assert len(pts) == 2 and pts[0].shape == (5, 2)
        assert lmk.get_landmarker("fixed") is lmk.get_landmarker("fixed")
    finally:
        lmk.LANDMARKERS.unregister("fixed")
    with pytest.raises(ConfigError, match="'fixed' is not allowed"):
        from_dict(AugmentConfig, {"landmarks": "fixed"}, "a")


def test_edit_one_records_which_mask_was_used(astronaut, face_box, monkeypatch):
    found = ellipse_points(face_box)
    monkeypatch.setattr("dfpipe.augment_sd.generate.face_landmarks",
                        lambda img, name: found if img.mean() > 0 else None)
    _, _, p = edit_one("self_blend", astronaut, 3, None, "fake_detector")
    assert p["landmarks"] == {"detector": "fake_detector", "face": True} and p["mask"]["shape"] == "landmark_hull"
    _, _, p = edit_one("self_blend", np.zeros((64, 64, 3), np.uint8), 3, None, "fake_detector")
    assert p["landmarks"] == {"detector": "fake_detector", "face": False} and p["mask"]["shape"] == "face_ellipse"
    _, _, p = edit_one("self_blend", astronaut, 3, None)  # landmarks: none (the default): no detector runs
    assert "landmarks" not in p and p["mask"]["shape"] == "face_ellipse"
    _, _, p = edit_one("splice", astronaut, 3, astronaut[::-1].copy(), "fake_detector")  # not a landmark method
    assert "landmarks" not in p


# --------------------------------------------------------------------------- the detector (mediapipe)
@needs_mediapipe
def test_mediapipe_landmarks_lie_on_the_face(astronaut, face_box):
    pts = lmk.face_landmarks(astronaut, "mediapipe")
    assert pts.shape == (468, 2) and pts.dtype == np.float32 and np.isfinite(pts).all()
    x, y, w, h = face_box[:4]
    cx, cy = pts.mean(0)
    assert x < cx < x + w and y < cy < y + h  # centred on the face the Haar cascade finds
    m = 0.3  # Face Mesh reaches the forehead, above Haar's box
    inside = ((pts[:, 0] > x - m * w) & (pts[:, 0] < x + (1 + m) * w)
              & (pts[:, 1] > y - m * h) & (pts[:, 1] < y + (1 + m) * h))
    assert inside.all()
    hull = face_hull(pts)
    assert 0.5 < cv2.contourArea(hull) / (w * h) < 2.0
    np.testing.assert_array_equal(lmk.face_landmarks(astronaut, "mediapipe"), pts)  # deterministic


@needs_mediapipe
def test_mediapipe_on_a_large_image_and_on_no_face(astronaut):
    pts = lmk.face_landmarks(astronaut, "mediapipe")
    big = cv2.resize(astronaut, (1536, 1536), interpolation=cv2.INTER_CUBIC)  # searched at 640 px, mapped back
    big_pts = lmk.face_landmarks(big, "mediapipe")
    face = np.ptp(pts, axis=0).max()
    assert np.abs(big_pts / 3.0 - pts).max() < 0.05 * face
    assert lmk.face_landmarks(np.ascontiguousarray(data.coffee()), "mediapipe") is None
    assert lmk.face_landmarks(np.full((200, 200, 3), 128, np.uint8), "mediapipe") is None
    batch = lmk.face_landmarks_batch([astronaut, np.full((64, 64, 3), 128, np.uint8)], "mediapipe")
    np.testing.assert_array_equal(batch[0], pts)
    assert batch[1] is None


@needs_mediapipe
@pytest.mark.skipif(not (SHARED / "yonsei_faces").is_dir(), reason="needs ../shared/data")
def test_mediapipe_finds_the_faces_of_real_crops():
    """Yonsei's real face crops (the face fills most of the image): a face in each, centred, and inside
    the Haar cascade's box where the cascade finds one (it misses most of these tight crops)."""
    files = sorted((SHARED / "yonsei_faces" / "trainset").glob("*.jpg"))[:30]
    haar = HaarDetector()
    found = checked = 0
    for f in files:
        img = cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB)
        h, w = img.shape[:2]
        pts = lmk.face_landmarks(img, "mediapipe")
        if pts is None:
            continue
        found += 1
        cx, cy = pts.mean(0)
        assert 0.25 * w < cx < 0.75 * w and 0.25 * h < cy < 0.75 * h, f.name
        assert cv2.contourArea(face_hull(pts)) > 0.15 * h * w, f.name
        boxes = [b for b in haar.detect(img) if b.w > 0.3 * min(h, w)]  # not a stray small box
        if boxes:
            b = max(boxes, key=lambda b: b.w * b.h)
            assert b.x < cx < b.x + b.w and b.y < cy < b.y + b.h, f.name
            checked += 1
    assert found >= 0.9 * len(files) and checked >= 3


def make_store(root, images):
    """A stage-1 image store with ``images`` as real train images (the last one in val)."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for split, imgs in (("train", images[:-1] or images), ("val", images[-1:])):
        shard = shard_name(split, 0)
        for i, idx in enumerate(write_png_shard(root / shard, imgs)):
            h, w = imgs[i].shape[:2]
            rows.append(dict(uid=f"{split}/{i}.jpg", img_name=f"{i}.jpg", split=split, label=0, path="",
                             cache_file=shard, cache_index=idx, orig_w=w, orig_h=h, width=w, height=h, error=""))
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    write_store_record(root, Stage1())
    return root


@needs_mediapipe
@pytest.mark.parametrize("workers", [1, 2])
def test_stage_with_mediapipe_landmarks_regenerates_without_the_detector(tmp_path, astronaut, monkeypatch, workers):
    from dfpipe.augment_sd import pipeline

    face = np.ascontiguousarray(astronaut[20:280, 120:330])  # a face crop, like the stage's inputs
    images = [face, np.ascontiguousarray(face[:, ::-1]), cv2.resize(face, (150, 186)),
              np.ascontiguousarray(data.coffee()[::2, ::2])]  # the last has no face
    prep = make_store(tmp_path / "prep", images)
    monkeypatch.setattr(pipeline, "MIN_JOBS_PER_WORKER", 1)
    out = tmp_path / "aug"
    cfg = AugmentConfig(seed=1, fakes_per_real=2.0, methods={"self_blend": 1.0}, contact_sheet_per_method=1,
                        landmarks="mediapipe", workers=workers)
    run_augment(cfg, layout_in(tmp_path, prepared=prep, augmented=out))
    man = pd.read_csv(out / "manifest.csv", keep_default_na=False)
    assert len(man) == 8
    shapes = {}
    monkeypatch.setattr(lmk, "get_landmarker", lambda name: pytest.fail("regenerate ran the detector"))
    for _, row in man.iterrows():
        p = json.loads(row.params)
        assert p["landmarks"]["detector"] == "mediapipe"
        shapes[row.source_uid] = (p["landmarks"]["face"], p["mask"]["shape"])
        fake, mask = regenerate(row, prep)
        assert fake.tobytes() == StoreReader().image(out / row.cache_file, int(row.cache_index)).tobytes()
    assert shapes == {"train/0.jpg": (True, "landmark_hull"), "train/1.jpg": (True, "landmark_hull"),
                      "train/2.jpg": (True, "landmark_hull"), "val/0.jpg": (False, "face_ellipse")}


def test_work_files_of_self_blend_depend_on_the_detector(tmp_path):
    """A run resumed with another ``augment_sd.landmarks`` remakes the self-blends, and only them."""
    from dfpipe.augment_sd.plan import plan_jobs
    from dfpipe.augment_sd.sources import load_reals
    from dfpipe.augment_sd.work import work_names

    prep = make_store(tmp_path / "prep", [data.astronaut(), data.astronaut()[::-1].copy(), data.coffee()])
    reals = load_reals(str(prep))
    base = AugmentConfig(fakes_per_real=3.0, methods={"self_blend": 1.0, "splice": 1.0})
    jobs = plan_jobs(base, len(reals))
    plain = work_names(jobs, reals, base, str(prep))
    lm = work_names(jobs, reals, dataclasses.replace(base, landmarks="mediapipe"), str(prep))
    assert {j.method for j in jobs} == {"self_blend", "splice"}
    for j, a, b in zip(jobs, plain, lm):
        assert (a != b) == (j.method == "self_blend"), j
