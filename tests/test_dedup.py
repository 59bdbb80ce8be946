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


def _flip(h: np.uint64, bits) -> np.uint64:
    for b in bits:
        h ^= np.uint64(1) << np.uint64(b)
    return h


def _brute(h: np.ndarray, d: int) -> list[tuple[int, int, int]]:
    out = []
    for a in range(len(h)):
        dist = np.bitwise_count(h[a] ^ h[a + 1:])
        out += [(a, int(b) + a + 1, int(dist[b])) for b in np.flatnonzero(dist <= d)]
    return out


@pytest.mark.parametrize("d", [0, 1, 4, 6])
def test_multi_index_pairs_are_exact_against_brute_force(d):
    """Clusters of near-duplicates at every distance 0..d (must pair) and d+1 (must not), plus noise."""
    from dfpipe.data.dedup import near_pairs_brute

    rng = np.random.default_rng(100 + d)
    hashes, must, must_not = [], [], []
    for _ in range(300):  # clusters around a random centre
        centre = rng.integers(0, 2**64, dtype=np.uint64, endpoint=False)
        c = len(hashes)
        hashes.append(centre)
        for dist in list(range(d + 2)) + [int(rng.integers(0, d + 2))]:
            bits = rng.choice(64, dist, replace=False)
            (must if dist <= d else must_not).append((c, len(hashes)))
            hashes.append(_flip(centre, bits))
    hashes += list(rng.integers(0, 2**64, 1500, dtype=np.uint64, endpoint=False))
    perm = rng.permutation(len(hashes))
    h = np.array(hashes, dtype=np.uint64)[perm]
    new = np.argsort(perm)  # old index -> new index
    expected = _brute(h, d)
    for block in (None, 7):
        i, j, dist = near_pairs(h, d, block=block)
        assert i.dtype == np.int64 and j.dtype == np.int64 and dist.dtype == np.int16
        assert list(zip(i.tolist(), j.tolist(), dist.tolist())) == expected  # same pairs, same (i, j) order
    found = set(zip(i.tolist(), j.tolist()))
    pair = lambda a, b: (min(new[a], new[b]), max(new[a], new[b]))  # noqa: E731
    assert all(pair(a, b) in found for a, b in must)
    assert not any(pair(a, b) in found for a, b in must_not)
    bi, bj, bd = near_pairs_brute(h, d)
    assert (bi.tolist(), bj.tolist(), bd.tolist()) == (i.tolist(), j.tolist(), dist.tolist())
    assert [x.tolist() for x in near_pairs(h, d, method="brute")] == [bi.tolist(), bj.tolist(), bd.tolist()]


def test_multi_index_matches_brute_force_with_repeated_hashes():
    """Many identical hashes mixed with near ones: the expansion of repeated values is exact too."""
    from dfpipe.data.dedup import near_pairs_brute

    rng = np.random.default_rng(7)
    centres = rng.integers(0, 2**64, 40, dtype=np.uint64, endpoint=False)
    h = centres[rng.integers(0, 40, 1200)]
    flips = rng.integers(0, 64, (1200, 3)).astype(np.uint64)
    masks = np.where(rng.random((1200, 3)) < 0.5, np.uint64(1) << flips, np.uint64(0))
    h = h ^ np.bitwise_or.reduce(masks, axis=1)
    for d in (0, 2, 4):
        got = [x.tolist() for x in near_pairs(h, d, block=1000)]
        assert got == [x.tolist() for x in near_pairs_brute(h, d)]


def test_giant_bucket_of_identical_hashes_is_fast_and_one_group():
    import time

    rng = np.random.default_rng(3)
    n_same = 3000
    h = np.concatenate([np.full(n_same, 0xDEADBEEF, dtype=np.uint64),
                        rng.integers(0, 2**64, 20000, dtype=np.uint64, endpoint=False)])
    h = h[rng.permutation(len(h))]
    t0 = time.perf_counter()
    i, j, d = near_pairs(h, 4)
    g = groups(len(h), i, j)
    elapsed = time.perf_counter() - t0
    same = np.flatnonzero(h == np.uint64(0xDEADBEEF))
    assert len(i) == n_same * (n_same - 1) // 2 and (d == 0).all()  # random others pair with nothing
    assert np.isin(i, same).all() and np.isin(j, same).all()
    assert len(set(g[same].tolist())) == 1 and len(set(g.tolist())) == len(h) - n_same + 1
    assert elapsed < 20, elapsed  # ~1 s; all-pairs over 24k hashes would not be the bottleneck, the bucket is


def test_find_duplicates_with_many_repeats_matches_pairwise_definition():
    """End to end: pairs, kinds, distances and groups equal the all-pairs definition."""
    from dfpipe.data.dedup import find_duplicates_arrays

    rng = np.random.default_rng(11)
    n = 1500
    base = rng.integers(0, 2**64, 300, dtype=np.uint64, endpoint=False)
    pick = rng.integers(0, 300, n)
    ph = base[pick] ^ np.where(rng.random(n) < 0.4, np.uint64(1) << rng.integers(0, 64, n).astype(np.uint64),
                               np.uint64(0))
    digests = np.array([f"{int(x):032x}".encode() for x in ph], dtype="S32")
    dh = rng.integers(0, 2**64, n, dtype=np.uint64, endpoint=False)
    uids = np.array([f"u{k}" for k in range(n)], dtype=object)
    splits = np.array(["train", "val", "test"], dtype=object)[rng.integers(0, 3, n)]
    pairs, gid = find_duplicates_arrays(uids, splits, ph, dh, digests, 2)
    expected = _brute(ph, 2)
    assert list(zip(pairs.a, pairs.b)) == [(uids[a], uids[b]) for a, b, _ in expected]
    assert pairs.distance.tolist() == [dd for _, _, dd in expected]
    assert list(pairs.columns) == ["a", "b", "split_a", "split_b", "distance", "dhash_distance", "kind"]
    assert (pairs.kind == np.where(pairs.distance == 0, "exact", "near")).all()
    ref = groups(n, np.array([a for a, _, _ in expected]), np.array([b for _, b, _ in expected]))
    assert gid.tolist() == ref.tolist()
