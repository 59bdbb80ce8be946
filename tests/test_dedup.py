import io

import cv2
import numpy as np
import pandas as pd
import pytest
import skimage.data
from PIL import Image

from dfpipe.data.dedup import dedup_report, find_duplicates, groups, hash_image, hamming, near_pairs, to_uint64


def _jpeg_roundtrip(img: np.ndarray, quality: int = 70) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def _table(images: dict[str, tuple[str, np.ndarray]]) -> pd.DataFrame:
    rows = []
    for uid, (split, img) in images.items():
        h = hash_image(img)
        rows.append(dict(uid=uid, split=split, phash=h.phash, dhash=h.dhash, digest=h.digest))
    return pd.DataFrame(rows)


def test_copies_are_found_and_a_different_image_is_not():
    astro = skimage.data.astronaut()
    images = {
        "train/a.jpg": ("train", astro),
        "val/copy.jpg": ("val", astro.copy()),
        "test/reenc.jpg": ("test", _jpeg_roundtrip(astro)),
        "train/small.jpg": ("train", cv2.resize(astro, (200, 200), interpolation=cv2.INTER_AREA)),
        "train/other.jpg": ("train", skimage.data.coffee()),
        "val/other2.jpg": ("val", skimage.data.chelsea()),
    }
    pairs, gid = find_duplicates(_table(images), max_distance=4)
    found = {frozenset((a, b)) for a, b in zip(pairs.a, pairs.b)}
    for other in ("val/copy.jpg", "test/reenc.jpg", "train/small.jpg"):
        assert frozenset(("train/a.jpg", other)) in found, other
    assert not any("other" in a or "other" in b for a, b in zip(pairs.a, pairs.b))
    exact = pairs[pairs.kind == "exact"]
    assert {frozenset(p) for p in zip(exact.a, exact.b)} == {frozenset(("train/a.jpg", "val/copy.jpg"))}
    assert (pairs.distance <= 4).all()
    # one group for the four astronauts, singletons for the rest
    assert len(set(gid[:4])) == 1 and len(set(gid)) == 3
    rep = dedup_report(pairs, gid, 4)
    assert rep["pairs"]["train_val"] >= 1 and rep["pairs"]["train_test"] >= 1 and rep["pairs"]["val_test"] >= 1
    assert rep["pairs"]["within_train"] == 1 and rep["n_pairs"] == 6 and rep["largest_group"] == 4


def test_groups_are_transitive():
    # a~b (1 bit), b~c (1 bit) but a, c are 2 bits apart: with max_distance 1 still one group
    h = np.array([0b000, 0b001, 0b011, 0xFFFF_FFFF_0000_0000, 0xFFFF_FFFF_0000_0001], dtype=np.uint64)
    i, j, d = near_pairs(h, 1)
    assert list(zip(i, j)) == [(0, 1), (1, 2), (3, 4)] and list(d) == [1, 1, 1]
    g = groups(len(h), i, j)
    assert g[0] == g[1] == g[2] and g[3] == g[4] and g[0] != g[3]
    assert list(groups(3, np.array([], int), np.array([], int))) == [0, 1, 2]  # singletons: own ids


@pytest.mark.parametrize("block", [1, 3, 1000])
def test_blocked_pairs_match_brute_force(block):
    rng = np.random.default_rng(1)
    base = rng.integers(0, 2**63, 40, dtype=np.uint64)
    flips = np.uint64(1) << rng.integers(0, 64, 40).astype(np.uint64)
    h = np.concatenate([base, base ^ flips])  # every base has a 1-bit neighbour
    i, j, d = near_pairs(h, 3, block=block)
    brute = {(a, b) for a in range(len(h)) for b in range(a + 1, len(h)) if bin(int(h[a] ^ h[b])).count("1") <= 3}
    assert set(zip(i.tolist(), j.tolist())) == brute
    assert (d == hamming(h[i], h[j])).all()


def test_hex_roundtrip_and_bad_distance():
    assert to_uint64(["ffffffffffffffff", "0000000000000001"]).tolist() == [2**64 - 1, 1]
    with pytest.raises(ValueError, match="dup_max_distance"):
        find_duplicates(pd.DataFrame(columns=["uid", "split", "phash", "dhash", "digest"]), -1)


def test_array_form_matches_the_table_form():
    from dfpipe.data.dedup import find_duplicates_arrays

    astro = skimage.data.astronaut()
    table = _table({"train/a": ("train", astro), "val/b": ("val", astro.copy()),
                    "test/c": ("test", _jpeg_roundtrip(astro)), "train/d": ("train", skimage.data.coffee())})
    pairs, gid = find_duplicates(table, 4)
    pairs2, gid2 = find_duplicates_arrays(table.uid.to_numpy(), table.split.to_numpy(), to_uint64(table.phash),
                                          to_uint64(table.dhash), table.digest.to_numpy(dtype="S32"), 4)
    pd.testing.assert_frame_equal(pairs, pairs2)
    assert gid.tolist() == gid2.tolist() and (pairs2.kind == "exact").sum() == 1 and len(set(gid2)) == 2
