"""Stage 2 without diffusion: editing forgeries, real widening, and the stage on a tiny prepared dir."""

import json
import logging
import os
import threading

import cv2
import numpy as np
import pandas as pd
import pytest

from conftest import layout_in, photo_like, write_jpeg
from dfpipe.augment_sd import generate, output, pipeline
from dfpipe.augment_sd import run as run_augment
from dfpipe.augment_sd.dist import Dist
from dfpipe.augment_sd import editing
from dfpipe.augment_sd.editing import MASK_GRID, METHODS, NEEDS_DONOR, get_method, region_mask
from dfpipe.augment_sd.generate import regenerate
from dfpipe.augment_sd.output import MANIFEST_COLUMNS
from dfpipe.augment_sd.pipeline import n_workers
from dfpipe.augment_sd.plan import item_seed, plan_jobs
from dfpipe.augment_sd.real import widen_real
from dfpipe.augment_sd.sheet import COLUMNS, GAP, LABEL_W, OUTLINE, TILE, TITLE_H, contact_sheet, sheet_width
from dfpipe.config import AugmentConfig
from dfpipe.data.preprocess import Stage1
from dfpipe.data.samples import load_pool
from dfpipe.data.store import StoreReader, read_store_record, shard_name, write_png_shard, write_store_record
from dfpipe.io import work_dir

ALL_METHODS = sorted(METHODS)


@pytest.fixture(scope="module")
def pair():
    rng = np.random.default_rng(7)
    return photo_like(rng, 64, 64), photo_like(rng, 64, 64)


def call(name, img, donor, seed):
    return METHODS[name](img.copy(), np.random.default_rng(seed), donor.copy() if name in NEEDS_DONOR else None)


# --------------------------------------------------------------------------- editing methods
@pytest.mark.parametrize("name", ALL_METHODS)
def test_method_changes_only_inside_its_mask(name, pair):
    img, donor = pair
    for seed in range(12):
        fake, mask, params = call(name, img, donor, seed)
        assert fake.shape == img.shape and fake.dtype == np.uint8
        assert mask.shape == img.shape[:2] and mask.dtype == np.float32
        assert 0.0 <= mask.min() and mask.max() <= 1.0
        outside = mask == 0
        np.testing.assert_array_equal(fake[outside], img[outside])
        inside = mask > 0
        assert inside.mean() > 0.01, f"{name} seed {seed}: mask covers {inside.mean():.3%}"
        diff = np.abs(fake.astype(int) - img.astype(int)).sum(axis=2)
        assert diff[inside].mean() > 1.0, f"{name} seed {seed}: no visible change inside the mask"
        assert (diff[inside] > 0).mean() > 0.3  # the mask is tight: most masked pixels changed
        json.dumps(params)  # recorded in the manifest
        # the mask survives the 8-bit PNG the stage writes
        np.testing.assert_array_equal(np.round(mask * 255).astype(np.uint8) / np.float32(255), mask)


def holes(mask: np.ndarray) -> int:
    """Pixels outside the mask that the image border cannot reach (holes in the blob)."""
    outside = np.pad((mask == 0).astype(np.uint8), 1, constant_values=1)
    cv2.floodFill(outside, None, (0, 0), 0)
    return int(outside.sum())


@pytest.mark.parametrize("name", ALL_METHODS)
def test_method_mask_is_one_solid_region(name, pair):
    img, donor = pair
    for seed in range(12):
        mask = call(name, img, donor, seed)[1]
        assert holes(mask) == 0, f"{name} seed {seed}: mask has holes"
        n_blobs = cv2.connectedComponents((mask > 0).astype(np.uint8))[0] - 1
        assert n_blobs == 1, f"{name} seed {seed}: {n_blobs} separate regions"


@pytest.mark.parametrize("name", ALL_METHODS)
def test_method_is_a_function_of_its_seed(name, pair):
    img, donor = pair
    a, ma, pa = call(name, img, donor, 3)
    b, mb, pb = call(name, img, donor, 3)
    c, mc, _ = call(name, img, donor, 4)
    assert a.tobytes() == b.tobytes() and ma.tobytes() == mb.tobytes() and pa == pb
    assert a.tobytes() != c.tobytes() and ma.tobytes() != mc.tobytes()


@pytest.mark.parametrize("name", ALL_METHODS)
def test_method_handles_non_square_images(name):
    rng = np.random.default_rng(1)
    img, donor = photo_like(rng, 48, 80), photo_like(rng, 70, 70)  # donor of another size is resized
    fake, mask, _ = call(name, img, donor, 0)
    assert fake.shape == img.shape and mask.shape == (48, 80)
    np.testing.assert_array_equal(fake[mask == 0], img[mask == 0])


def test_self_blend_mask_is_soft_and_centred(pair):
    img, _ = pair
    masks = np.stack([call("self_blend", img, img, s)[1] for s in range(20)])
    soft = ((masks > 0) & (masks < 1)).mean()
    assert soft > 0.02  # blurred edges, not a hard cut
    ys, xs = np.nonzero(masks.mean(0) > 0.5)
    assert abs(ys.mean() - 32) < 6 and abs(xs.mean() - 32) < 6  # face-shaped ellipse near the centre


def test_splice_uses_the_donor_and_needs_one(pair):
    img, donor = pair
    a = METHODS["splice"](img, np.random.default_rng(0), donor)[0]
    b = METHODS["splice"](img, np.random.default_rng(0), 255 - donor)[0]
    assert a.tobytes() != b.tobytes()
    with pytest.raises(ValueError, match="donor"):
        METHODS["splice"](img, np.random.default_rng(0), None)


def test_splice_uses_both_blend_modes(pair):
    img, donor = pair
    blends = {call("splice", img, donor, s)[2]["blend"] for s in range(16)}
    assert blends == {"alpha", "seamless"}


def test_inputs_are_not_modified_and_bad_input_is_rejected(pair):
    img, donor = pair
    before = img.copy()
    for name in ALL_METHODS:
        METHODS[name](img, np.random.default_rng(0), donor)
    np.testing.assert_array_equal(img, before)
    with pytest.raises(ValueError, match="uint8"):
        METHODS["self_blend"](img.astype(np.float32), np.random.default_rng(0), None)
    with pytest.raises(ValueError, match="self_blend"):
        get_method("nope")


# --------------------------------------------------------------------------- native-resolution masks
MASK_KINDS = [dict(face=True), dict(scale=(0.12, 0.25)), dict(scale=(0.1, 0.22), soft=False)]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0.5, b > 0.5
    return float((a & b).sum() / max(1, (a | b).sum()))


@pytest.mark.parametrize("kind", MASK_KINDS, ids=["face", "blob", "hard"])
def test_region_mask_on_the_grid_matches_drawing_at_full_size(kind):
    """At 2000x1500 the mask is drawn on a MASK_GRID grid and resized: it equals, up to resampling, the
    same region drawn directly at 2000x1500 (grid=None: same random draws, full-size kernels)."""
    h, w = 1500, 2000
    for seed in (0,) if kind.get("face") else (0, 1):  # a hull and an ellipse for the non-face kinds
        a, pa = region_mask(h, w, np.random.default_rng(seed), **kind)
        b, pb = region_mask(h, w, np.random.default_rng(seed), grid=None, **kind)
        assert pa == pb
        assert a.shape == (h, w) and a.dtype == np.float32 and a.min() == 0.0 and a.max() == 1.0
        np.testing.assert_array_equal(np.round(a * 255).astype(np.uint8) / np.float32(255), a)  # 8-bit levels
        assert np.abs(a - b).mean() < 0.01 and iou(a, b) > 0.95, (seed, kind)
        if not kind.get("soft", True):  # a hard mask stays hard: an edge about a pixel wide, not a grid pixel
            edge = lambda m: int(((m > 0) & (m < 1)).sum())  # noqa: E731
            assert edge(a) < 2 * edge(b), (edge(a), edge(b))


def test_region_mask_shape_does_not_depend_on_resolution():
    """Params are relative and the random draws do not depend on the size: one seed gives one region."""
    for seed in range(4):
        for kind in MASK_KINDS:
            big, p_big = region_mask(1500, 2000, np.random.default_rng(seed), **kind)
            small, p_small = region_mask(375, 500, np.random.default_rng(seed), **kind)
            assert {k: p_big[k] for k in ("shape", "cx", "cy", "ax", "ay", "angle")} == \
                   {k: p_small[k] for k in ("shape", "cx", "cy", "ax", "ay", "angle")}
            down = cv2.resize(big, (500, 375), interpolation=cv2.INTER_AREA)
            assert np.abs(down - small).mean() < 0.02 and iou(down, small) > 0.9, (seed, kind)


def test_small_images_are_drawn_directly():
    """Up to MASK_GRID pixels a side the grid is the image itself: the same bytes as grid=None."""
    for h, w in [(64, 64), (48, 80), (MASK_GRID, MASK_GRID - 56)]:
        for seed in range(3):
            for kind in MASK_KINDS:
                a = region_mask(h, w, np.random.default_rng(seed), **kind)
                b = region_mask(h, w, np.random.default_rng(seed), grid=None, **kind)
                assert a[0].tobytes() == b[0].tobytes() and a[1] == b[1]


def test_methods_at_native_resolution_do_bounded_work(monkeypatch):
    """One fake of each method at 2048x1536: masks keep their contract, and no size-dependent kernel
    runs at full size (the cost used to grow with the side: blurs of sigma ~ 5-12 % of the side on the
    whole image, 2.7 s a mask). Blurs with a large kernel and the elastic remap only see the mask grid;
    full-size blurs are the fixed 0.5-1.5 px filters. Timings: bench/bench_editing.py."""
    calls = {"blur": [], "remap": []}
    blur, remap = cv2.GaussianBlur, cv2.remap

    def rec_blur(x, ksize, *a, **k):
        calls["blur"].append((x.shape[:2], ksize))
        return blur(x, ksize, *a, **k)

    def rec_remap(x, *a, **k):
        calls["remap"].append(x.shape[:2])
        return remap(x, *a, **k)

    monkeypatch.setattr(editing.cv2, "GaussianBlur", rec_blur)
    monkeypatch.setattr(editing.cv2, "remap", rec_remap)
    rng = np.random.default_rng(3)
    img = cv2.resize(photo_like(rng, 96, 128), (2048, 1536), interpolation=cv2.INTER_LINEAR)
    donor = cv2.resize(photo_like(rng, 96, 128), (2048, 1536), interpolation=cv2.INTER_LINEAR)
    for name in ALL_METHODS:
        fake, mask, _ = call(name, img, donor, 1)
        assert fake.shape == img.shape and mask.shape == (1536, 2048) and mask.dtype == np.float32
        assert 0.0 <= mask.min() and mask.max() <= 1.0 and 0.01 < (mask > 0).mean() < 0.95
        np.testing.assert_array_equal(fake[mask == 0], img[mask == 0])
    assert calls["remap"] and all(max(s) <= MASK_GRID for s in calls["remap"])
    assert calls["blur"]
    for shape, (kx, ky) in calls["blur"]:
        assert max(shape) <= MASK_GRID or max(kx, ky) <= 9, (shape, kx, ky)
    # the grid's kernels are bounded too: sigma <= 12 % of the grid's side
    assert max(max(k) for _, k in calls["blur"]) <= 6 * 0.12 * MASK_GRID + 2


# --------------------------------------------------------------------------- real widening
def test_widen_real_changes_image_keeps_shape_and_is_seeded(pair):
    img, _ = pair
    outs = [widen_real(img, np.random.default_rng(s)) for s in range(10)]
    for out, params in outs:
        assert out.shape == img.shape and out.dtype == np.uint8
        assert np.abs(out.astype(int) - img.astype(int)).mean() > 0.2
        assert params["chain"][-1]["op"] == "jpeg"
        json.dumps(params)
    assert len({o.tobytes() for o, _ in outs}) == 10
    assert widen_real(img, np.random.default_rng(3))[0].tobytes() == outs[3][0].tobytes()
    ops = {step["op"] for _, p in outs for step in p["chain"]}
    assert {"jpeg", "resize", "colour"} <= ops


# --------------------------------------------------------------------------- the stage
SIZES = [(64, 64), (48, 80), (80, 56)]  # (h, w) of the prepared images, cycled: native sizes differ


def make_prepared(root, n_train=8, n_val=4, shard_images=5):
    """A stage-1 style image store: PNG shards of ``shard_images`` images per split (train spans two),
    ``store.json`` and a manifest (one failed decode); images of several sizes (:data:`SIZES`)."""
    rng = np.random.default_rng(5)
    rows, k = [], 0
    for split, n in (("train", n_train), ("val", n_val), ("test", 2)):
        imgs = []
        for _ in range(n):
            imgs.append(photo_like(rng, *SIZES[k % len(SIZES)]))
            k += 1
        for c in range(0, n, shard_images):
            shard = shard_name(split, c // shard_images)
            index = write_png_shard(root / shard, imgs[c:c + shard_images])
            for i, idx in zip(range(c, c + shard_images), index):
                h, w = imgs[i].shape[:2]
                label = -1 if split == "test" else int(i % 2 != 0)
                rows.append(dict(uid=f"{split}/{split}_{i}.jpg", img_name=f"{split}_{i}.jpg", split=split,
                                 label=label, path=f"/raw/{split}_{i}.jpg", cache_file=shard, cache_index=idx,
                                 orig_w=w, orig_h=h, width=w, height=h, error=""))
    rows.append(dict(uid="train/broken.jpg", img_name="broken.jpg", split="train", label=0, path="/raw/broken.jpg",
                     cache_file=shard_name("train", 0), cache_index=-1, orig_w=0, orig_h=0, width=0, height=0,
                     error="empty file (0 bytes)"))
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    write_store_record(root, Stage1())
    return root


def prepared_image(prepared, uid):
    """The stage-1 image of ``uid`` in a prepared store."""
    row = pd.read_csv(prepared / "manifest.csv", keep_default_na=False).set_index("uid").loc[uid]
    return StoreReader().image(prepared / row.cache_file, int(row.cache_index))


def stored(out, row):
    """A stage-2 row's image, read back from the stage-2 store."""
    return StoreReader().image(out / row.cache_file, int(row.cache_index))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return make_prepared(tmp_path_factory.mktemp("prepared"))


def config(**kw):
    base = dict(seed=3, fakes_per_real=2.0, methods={m: 1.0 for m in ALL_METHODS}, real_widening=0.5,
                contact_sheet_per_method=2, workers=1)
    base.update(kw)
    return AugmentConfig(**base)


def layout(prepared, out):
    """Stage 2 reading the store ``prepared``, writing ``out``."""
    return layout_in(out.parent, prepared=prepared, augmented=out)


def stage(prepared, out, **kw):
    """Stage 2 with the test settings (``kw`` changed) from ``prepared`` into ``out``: its summary."""
    return run_augment(config(**kw), layout(prepared, out))


@pytest.fixture(scope="module")
def augmented(prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("aug") / "augmented"
    summary = stage(prepared, out)
    return out, summary


def real_uids(prepared):
    man = pd.read_csv(prepared / "manifest.csv", keep_default_na=False)
    ok = man[man.split.isin(["train", "val"]) & (man.label == 0) & (man.cache_index >= 0)]
    return set(ok.uid), man.set_index("uid")


def test_stage_manifest_counts_and_labels(augmented, prepared):
    out, summary = augmented
    man = pd.read_csv(out / "manifest.csv", keep_default_na=False)
    assert list(man.columns) == MANIFEST_COLUMNS
    reals, _ = real_uids(prepared)
    assert len(reals) == 6  # 4 train + 2 val reals; the broken row is not a source
    edits, widened = man[man.method != "widen_real"], man[man.method == "widen_real"]
    assert len(edits) == 12 and len(widened) == 3
    assert set(edits.method) <= set(METHODS) and edits.method.nunique() >= 3
    assert (edits.label == 1).all() and (widened.label == 0).all()
    assert set(man.source_uid) <= reals
    assert set(man.source_uid[:6]) == reals  # every real is used once before any is used twice
    assert man.uid.is_unique and (man.uid == "aug/" + man.img_name).all()
    # one shard (fewer than SHARD_IMAGES images), rows in plan order
    assert (man.cache_file == "aug-000000.bin").all() and list(man.cache_index) == list(range(len(man)))
    splice = man[man.method == "splice"]
    assert (splice.donor_uid != "").all() and (splice.donor_uid != splice.source_uid).all()
    assert set(splice.donor_uid) <= reals and (man[man.method != "splice"].donor_uid == "").all()
    assert summary["n_images"] == 15 and summary["n_fake"] == 12 and summary["n_widened_real"] == 3
    assert summary["n_diffusion"] == 0 and sum(summary["by_method"].values()) == 15 and summary["n_shards"] == 1
    assert summary["image_sizes"] == {"width": [56, 80], "height": [48, 80], "n_distinct": 3}
    assert json.loads((out / "summary.json").read_text()) == summary
    assert read_store_record(out) == read_store_record(prepared)  # generated images: same stage-1 contract
    assert sorted(p.name for p in out.iterdir()) == ["aug-000000.bin", "aug-000000.idx.npy", "contact_sheet.png",
                                                     "manifest.csv", "masks", "store.json", "summary.json"]


def test_stage_images_masks_and_contact_sheet(augmented, prepared):
    out, _ = augmented
    man = pd.read_csv(out / "manifest.csv", keep_default_na=False)
    shapes = set()
    for row in man.itertuples():
        src = prepared_image(prepared, row.source_uid)
        fake = stored(out, row)
        assert fake.dtype == np.uint8 and fake.shape == src.shape  # each image keeps its source's own size
        shapes.add(src.shape)
        if row.label == 0:
            assert row.mask_path == "" and not np.array_equal(fake, src)
            continue
        mask = cv2.imread(str(out / row.mask_path), cv2.IMREAD_UNCHANGED)
        assert mask.dtype == np.uint8 and mask.shape == src.shape[:2] and (mask > 0).mean() > 0.01
        np.testing.assert_array_equal(fake[mask == 0], src[mask == 0])
        assert (fake[mask > 0] != src[mask > 0]).any()
        assert json.loads(row.params)
    assert len(shapes) == 3  # sources of different sizes: fakes of their own sizes
    sheet = cv2.cvtColor(cv2.imread(str(out / "contact_sheet.png")), cv2.COLOR_BGR2RGB)
    n_methods = man.method.nunique()
    # a title row over one row per method of TILE px tiles; the fakes' masks outlined, the widened reals' not
    assert sheet.shape == (TITLE_H + n_methods * TILE + (n_methods - 1) * 2 * GAP, sheet_width(2), 3)
    assert (sheet[:TITLE_H] < 128).any()
    green = np.all(sheet == OUTLINE, axis=2)
    rows = {m: green[TITLE_H + i * (TILE + 2 * GAP):][:TILE] for i, m in enumerate(dict.fromkeys(man.method))}
    assert not rows.pop("widen_real").any() and all(r.any() for r in rows.values())
    assert not list(out.parent.glob("*.tmp"))


def _titled(tile: np.ndarray) -> bool:
    return bool((tile < 128).any())


def test_contact_sheet_has_column_titles_big_tiles_and_a_zoomed_outlined_edit(pair):
    """A faint edit in a corner (a self-blend at 0.4 over an eighth of the image) is outlined on the whole fake and
    zoomed into the next tiles, under a title row that names every column; a row without a mask outlines nothing.
    (Before: no titles, 128 px tiles, the mask as a grey tile of its own, nothing zoomed.)"""
    src = cv2.resize(pair[0], (120, 90), interpolation=cv2.INTER_LINEAR)
    mask = np.zeros((90, 120), np.float32)
    mask[8:38, 76:112] = 0.4
    fake = (src * (1 - mask[..., None]) + (255 - src) * mask[..., None]).astype(np.uint8)
    widened = np.clip(src.astype(np.int16) + 6, 0, 255).astype(np.uint8)
    sheet = contact_sheet({"self_blend": [(src, fake, mask)], "widen_real": [(src, widened, None)]}, per_method=1)
    assert TILE >= 160 and sheet.shape == (TITLE_H + 2 * TILE + 2 * GAP, LABEL_W + 4 * TILE + 3 * GAP, 3)
    title = sheet[:TITLE_H]
    assert _titled(title[:, :LABEL_W]) and len(COLUMNS) == 4
    assert all(_titled(title[:, LABEL_W + j * (TILE + GAP):][:, :TILE]) for j in range(4))
    blend, widen = sheet[TITLE_H:TITLE_H + TILE], sheet[TITLE_H + TILE + 2 * GAP:]
    tiles = [blend[:, LABEL_W + j * (TILE + GAP):][:, :TILE] for j in range(4)]
    green = [np.all(t == OUTLINE, axis=2) for t in tiles]
    assert not np.all(widen == OUTLINE, axis=2).any()
    assert green[0].any() and green[2].any() and not green[1].any() and not green[3].any()
    # the outline fills the zoomed tile (most of its width) but a third of the whole-image tile at most
    span = [np.ptp(np.nonzero(g)[1]) for g in (green[0], green[2])]
    assert span[0] < TILE / 3 and span[1] > TILE / 2
    assert tiles[3].mean() > 20  # |fake - source| x4 of the zoom: the faint blend shows


def test_stage_is_deterministic_and_regenerates_rows(augmented, prepared, tmp_path):
    out, _ = augmented
    again = tmp_path / "again"
    stage(prepared, again)
    assert same_output(out, again)  # shards, index, manifest, masks, sheet: the same bytes
    man = pd.read_csv(out / "manifest.csv", keep_default_na=False)
    for _, row in man.iterrows():
        fake, mask = regenerate(row, prepared)
        # the store is lossless: the image read back is, pixel for pixel, what the method made
        back = stored(out, row)
        assert fake.shape == back.shape == prepared_image(prepared, row.source_uid).shape, row.uid
        assert fake.tobytes() == back.tobytes(), row.uid
        if row.mask_path:
            saved = cv2.imread(str(out / row.mask_path), cv2.IMREAD_UNCHANGED)
            np.testing.assert_array_equal(np.round(mask * 255).astype(np.uint8), saved)
        else:
            assert mask is None


def test_stage_writes_shards_of_at_most_shard_images(prepared, tmp_path, monkeypatch, augmented):
    ref, _ = augmented
    monkeypatch.setattr(output, "SHARD_IMAGES", 4)
    out = tmp_path / "sharded"
    summary = stage(prepared, out)
    man = pd.read_csv(out / "manifest.csv", keep_default_na=False)
    assert summary["n_shards"] == 4 and list(man.cache_file) == [f"aug-{k // 4:06d}.bin" for k in range(15)]
    assert list(man.cache_index) == [k % 4 for k in range(15)]
    assert [len(np.load(out / f"aug-{k:06d}.idx.npy")) for k in range(4)] == [4, 4, 4, 3]
    ref_man = pd.read_csv(ref / "manifest.csv", keep_default_na=False)
    for a, b in zip(man.itertuples(), ref_man.itertuples()):
        assert stored(out, a).tobytes() == stored(ref, b).tobytes()  # same images, other shard layout
    # what stages 3-5 read: load_pool points at <layout.augmented>/<cache_file>
    pool = load_pool(prepared, out)
    gen = pool[pool.origin == "aug"].reset_index(drop=True)
    assert len(gen) == 15
    for r, m in zip(gen.itertuples(), man.itertuples()):
        img = StoreReader().image(r.cache_path, int(r.cache_index))
        assert img.tobytes() == stored(out, m).tobytes()


def test_stage_on_a_stage1_store_of_jpegs(tmp_path):
    """Stage 1 for real on JPEGs of several sizes (stored as their original bytes), then stage 2 on its store."""
    from dfpipe.config import PrepareConfig
    from dfpipe.prepare_data import run as prepare

    rng = np.random.default_rng(11)
    raw = tmp_path / "raw"
    sizes = [(60, 90), (96, 72), (70, 70), (88, 64)]
    for split, folder in (("train", "trainset"), ("val", "valset")):
        names = []
        for i, (h, w) in enumerate(sizes):
            write_jpeg(raw / folder / f"{split}_{i}.jpg", photo_like(rng, h, w))
            names.append((f"{split}_{i}.jpg", i % 2))
        pd.DataFrame(names, columns=["img_name", "target"]).to_csv(raw / f"{folder}_label.txt", index=False)
    write_jpeg(raw / "testset" / "t0.jpg", photo_like(rng, 50, 50))
    prep = tmp_path / "prepared"
    prepare(PrepareConfig(workers=1), layout_in(tmp_path, data_root=raw, prepared=prep))
    out = tmp_path / "aug"
    summary = stage(prep, out, fakes_per_real=1.5, real_widening=0.5)
    assert summary["n_real_sources"] == 4 and summary["n_images"] == 8
    assert read_store_record(out) == read_store_record(prep)
    man = pd.read_csv(out / "manifest.csv", keep_default_na=False)
    for _, row in man.iterrows():
        src = prepared_image(prep, row.source_uid)
        fake, _ = regenerate(row, prep)
        assert fake.shape == src.shape and stored(out, row).tobytes() == fake.tobytes(), row.uid


def test_stage_refuses_a_prepared_folder_that_is_not_a_store(tmp_path):
    (tmp_path / "p").mkdir()
    prep = make_prepared(tmp_path / "p")
    (prep / "store.json").unlink()  # e.g. an old stage 1 (.npy caches)
    with pytest.raises(FileNotFoundError, match="store.json not found.*01_prepare_data"):
        stage(prep, tmp_path / "aug")
    assert not (tmp_path / "aug").exists()


def test_stage_other_seed_gives_other_images(augmented, prepared, tmp_path):
    out, _ = augmented
    other = tmp_path / "other"
    stage(prepared, other, seed=4)
    assert (out / "aug-000000.bin").read_bytes() != (other / "aug-000000.bin").read_bytes()


def test_stage_replaces_stale_output_and_logs_diffusion_skip(prepared, tmp_path, caplog):
    out = tmp_path / "aug"
    (out / "masks").mkdir(parents=True)
    (out / "stale.txt").write_text("old")
    (out / "masks" / "old.png").write_bytes(b"x")
    with caplog.at_level(logging.INFO, logger="dfpipe.augment_sd.pipeline"):
        summary = stage(prepared, out, fakes_per_real=0.5, methods={"self_blend": 1.0}, real_widening=0.0)
    assert "diffusion fakes skipped: no model configured" in caplog.text
    assert not (out / "stale.txt").exists() and not (out / "masks" / "old.png").exists()
    assert summary["by_method"] == {"self_blend": 3}


def test_stage_with_nothing_to_make_writes_an_empty_valid_output(prepared, tmp_path):
    out = tmp_path / "empty"
    summary = stage(prepared, out, fakes_per_real=0.0, real_widening=0.0)
    assert summary["n_images"] == 0 and summary["n_shards"] == 0 and summary["image_sizes"] is None
    assert not list(out.glob("*.bin")) and (out / "store.json").is_file()
    man = pd.read_csv(out / "manifest.csv")
    assert list(man.columns) == MANIFEST_COLUMNS and len(man) == 0
    assert len(load_pool(prepared, out)) == len(load_pool(prepared))  # stages 3-5 read the empty output


def test_stage_rejects_unknown_method_and_no_reals(prepared, tmp_path):
    with pytest.raises(ValueError, match=r"unknown method\(s\) \['nope'\].*self_blend"):
        stage(prepared, tmp_path / "x", methods={"self_blend": 1.0, "nope": 1.0})
    with pytest.raises(ValueError, match="positive weight"):
        stage(prepared, tmp_path / "x", methods={"self_blend": 0.0})
    fakes_only = tmp_path / "fakes_only"
    fakes_only.mkdir()
    make_prepared(fakes_only)
    man = pd.read_csv(fakes_only / "manifest.csv", keep_default_na=False)
    man.loc[(man.split != "test") & (man.cache_index >= 0), "label"] = 1  # only the broken row is "real"
    man.to_csv(fakes_only / "manifest.csv", index=False)
    with pytest.raises(ValueError, match="no real"):
        stage(fakes_only, tmp_path / "y")
    assert not (tmp_path / "y").exists()


def test_plan_seeds_and_method_weights():
    jobs = plan_jobs(config(fakes_per_real=1.0, methods={"self_blend": 3.0, "splice": 1.0}, real_widening=0.0),
                     n_real=400)
    counts = pd.Series([j.method for j in jobs]).value_counts()
    assert len(jobs) == 400 and 250 < counts["self_blend"] < 350
    assert len({j.seed for j in jobs}) == 400
    # a row's seed depends on (seed, kind, index) only, not on how many rows are planned
    assert jobs[5].seed == item_seed(3, "edit", 5)
    assert plan_jobs(config(fakes_per_real=0.5), n_real=400)[5].seed == jobs[5].seed
    assert all(j.donor not in (-1, j.source) for j in jobs if j.method == "splice")


# --------------------------------------------------------------------------- resume, workers, shards
def same_output(a, b):
    """Two stage outputs hold the same files with the same bytes."""
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    return True


# where the stage looks each one up: edit_one in the editing worker (generate.edit_chunk), sd_batch in pipeline
CALLED_FROM = {"edit_one": generate, "sd_batch": pipeline}
ORIGINAL = {name: getattr(module, name) for name, module in CALLED_FROM.items()}


class Killed(Exception):
    """Stands for the process being killed mid-run."""


def counting(monkeypatch, name, fail_after=None):
    """Wrap ``<name>`` (edit_one or sd_batch) where the stage calls it, to record the images it makes; raise after
    ``fail_after``."""
    real, made = ORIGINAL[name], []

    def wrapper(*args, **kwargs):
        n = len(args[2]) if name == "sd_batch" else 1
        if fail_after is not None and len(made) + n > fail_after:
            raise Killed("simulated kill")
        made.extend([args[0]] if name == "edit_one" else list(args[3]))  # method names / diffusion seeds
        return real(*args, **kwargs)

    monkeypatch.setattr(CALLED_FROM[name], name, wrapper)
    return made


def test_killed_run_resumes_without_redoing_images(augmented, prepared, tmp_path, monkeypatch):
    ref, _ = augmented
    out = tmp_path / "aug"
    counting(monkeypatch, "edit_one", fail_after=5)
    with pytest.raises(Killed):
        stage(prepared, out)
    assert not out.exists() and not (tmp_path / "aug.tmp").exists()
    assert len(list(work_dir(out).glob("*.npz"))) == 5 and not list(work_dir(out).glob(".*"))
    made = counting(monkeypatch, "edit_one")
    stage(prepared, out)
    assert len(made) == 15 - 5  # only the missing images
    assert same_output(ref, out) and not work_dir(out).exists()


def test_work_from_another_config_is_not_reused(prepared, tmp_path, monkeypatch):
    out = tmp_path / "aug"
    counting(monkeypatch, "edit_one", fail_after=6)
    with pytest.raises(Killed):
        stage(prepared, out)
    made = counting(monkeypatch, "edit_one")
    stage(prepared, out, seed=4)  # other seeds: nothing in the work dir matches
    assert len(made) == 15
    fresh = tmp_path / "fresh"
    stage(prepared, fresh, seed=4)
    assert same_output(out, fresh) and not work_dir(out).exists()


def test_worker_pool_gives_the_same_bytes(augmented, prepared, tmp_path, monkeypatch):
    ref, _ = augmented
    monkeypatch.setattr(pipeline, "MIN_JOBS_PER_WORKER", 1)
    monkeypatch.setattr(pipeline, "EDIT_CHUNK", 4)
    assert n_workers(2, 15) == 2
    out = tmp_path / "pool"
    stage(prepared, out, workers=2)
    assert same_output(ref, out)


def test_editing_worker_stores_each_image_of_its_chunk(pair, tmp_path):
    """generate.edit_chunk (the pool's task, and the in-process loop) stores, per (job, name), exactly what
    edit_one makes from the job's source, donor and seed: the PNG of the image, the mask and the params."""
    from dfpipe.augment_sd.plan import Job
    from dfpipe.augment_sd.work import encode_mask, load_work
    from dfpipe.data.store import encode_png

    images = list(pair)
    tasks = [(Job("edit", "splice", 0, 1, 11), "a.npz"), (Job("widen", pipeline.WIDEN, 1, -1, 12), "b.npz")]
    assert generate.edit_chunk(tasks, generate.worker_state(images.__getitem__, tmp_path)) == 2
    for (job, name), donor in zip(tasks, (images[1], None)):
        fake, mask, params = generate.edit_one(job.method, images[job.source], job.seed, donor)
        png, mask_png, params_json = load_work(tmp_path / name)
        assert png == encode_png(fake) and json.loads(params_json) == json.loads(json.dumps(params))
        assert mask_png == (None if mask is None else encode_mask(mask))
    assert (mask_png is None) == (tasks[1][0].method == pipeline.WIDEN)  # a widened real has no mask


def test_n_workers():
    assert n_workers(3, 10_000) == 3 and n_workers(3, 10) == 1  # small runs stay in-process
    assert 1 <= n_workers(0, 10_000) <= (os.cpu_count() or 1)
    assert n_workers(0, 10_000, world=10_000) == 1
    with pytest.raises(ValueError, match="workers"):
        n_workers(-1, 10)


def run_ranks(cfg, layout, world):
    """``run_augment`` as ``world`` ranks (threads sharing a barrier): the shard/merge logic in one process."""
    barrier = threading.Barrier(world, timeout=60)
    results, errors = [None] * world, []

    def rank(r):
        try:
            results[r] = run_augment(cfg, layout, Dist(rank=r, world=world, _barrier=barrier.wait))
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def test_shards_merge_to_the_one_process_output(augmented, prepared, tmp_path, monkeypatch):
    ref, summary = augmented
    made = counting(monkeypatch, "edit_one")
    results = run_ranks(config(), layout(prepared, tmp_path / "aug3"), world=3)
    assert results[0] == summary and [r["generated"] for r in results[1:]] == [5, 5]
    assert sorted(made) == sorted(pd.read_csv(ref / "manifest.csv").method)  # each image made once
    assert same_output(ref, tmp_path / "aug3")


def test_dist_shard_is_disjoint_and_covers():
    items = list(range(10))
    shards = [Dist(rank=r, world=3).shard(items) for r in range(3)]
    assert sorted(sum(shards, [])) == items and [len(s) for s in shards] == [4, 3, 3]
    assert Dist().shard(items) == items and Dist().is_main and not Dist(rank=1, world=2).is_main
