"""Near-duplicate / leak detection with perceptual hashes.

Stage 1's worker hashes every decoded image (before any face crop): a 64-bit pHash and dHash
(``imagehash``) and a digest of the decoded pixels. Two images are

* ``exact`` duplicates when their decoded pixels are identical (same digest), and
* ``near`` duplicates when their pHash Hamming distance is <= ``prepare_data.dup_max_distance``
  (a re-encoded JPEG is typically 0-2 bits away, a resized copy 0-4; unrelated photos ~32).

Pairing (:func:`near_pairs`) is exact and sub-quadratic: multi-index hashing in plain numpy.

1. Identical hashes are collapsed first (``np.unique``): a bucket of thousands of identical hashes
   (blank frames, one photo copied many times) becomes one value, so candidate generation never
   sees it; its members are paired with each other (distance 0) only when the output is expanded.
2. The 64 bits are split into ``d + 1`` disjoint blocks (d = ``max_distance``; 13/13/13/13/12 bits
   for d = 4). Two hashes within distance d differ in at most d blocks, so by pigeonhole they are
   *equal* on at least one block. For each block the distinct hashes are sorted by that block's
   value and every pair inside a run of equal values is a candidate.
3. Candidates are verified with a popcount of the XOR (``np.bitwise_count``); a pair is kept only
   in the first block on which it agrees, so no pair is reported twice. Candidates are processed
   ``block`` at a time, so memory stays O(N + block) whatever the bucket sizes.

Exactness: every pair within distance d shares a block (pigeonhole) and every reported pair is
verified, so the result is the same set of pairs as an all-pairs comparison
(:func:`near_pairs_brute`, the former implementation, kept as the reference and used when d >= 16,
where blocks would be too short to be selective). Cost on random-like hashes is
O(N log N + N^2 (d+1) / 2^(64/(d+1))) candidate checks: about 5 s at N = 700k, d = 4 on one core
(8 s for :func:`find_duplicates_arrays` end to end, ~0.7 GB peak RSS;
``bench/bench_dedup.py``, ``reports/bench/bench_dedup.json``), versus ~30 min for all pairs.
The output itself is not bounded: k images with one identical hash still yield k(k-1)/2 pairs.

Resume: none is needed. Stage 1 persists every image's hashes (phash, dhash, digest columns) in the
committed chunk files of its work dir as each chunk finishes; a resumed run re-reads them in
``_publish`` and simply redoes the pairing, which takes well under the ~2 min budget at 700k.

Groups are the connected components of the duplicate graph (transitive: a~b, b~c puts a, b, c in
one group), so a split can keep every member of a group in one fold.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import imagehash
import numpy as np
import pandas as pd
from PIL import Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

log = logging.getLogger(__name__)

DUP_COLUMNS = ["a", "b", "split_a", "split_b", "distance", "dhash_distance", "kind"]
SPLIT_ORDER = ("train", "val", "test")


@dataclass(frozen=True)
class ImageHashes:
    """Hashes of one decoded image; pHash/dHash as 16-hex-digit strings (64 bits)."""

    phash: str
    dhash: str
    digest: str


def hash_image(img: np.ndarray) -> ImageHashes:
    """pHash, dHash and a pixel digest of an (H, W, 3) uint8 RGB array."""
    pil = Image.fromarray(img)
    digest = hashlib.blake2b(img.tobytes(), digest_size=16, person=b"dfpipe-px")
    digest.update(np.asarray(img.shape, dtype=np.int64).tobytes())
    return ImageHashes(str(imagehash.phash(pil)), str(imagehash.dhash(pil)), digest.hexdigest())


def to_uint64(hex_hashes: list[str] | pd.Series) -> np.ndarray:
    """16-hex-digit hash strings -> uint64 array."""
    return np.array([int(h, 16) for h in hex_hashes], dtype=np.uint64)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Element-wise (broadcast) Hamming distance of uint64 arrays."""
    return np.bitwise_count(np.bitwise_xor(a, b)).astype(np.int16)


BRUTE_MIN_DISTANCE = 16  # from here on blocks are <= 3 bits: multi-index hashing gains nothing
DEFAULT_BLOCK = 1 << 21  # candidate pairs verified per vectorised step (~100 MB of temporaries)


def near_pairs(hashes: np.ndarray, max_distance: int, block: int | None = None,
               method: str = "auto") -> tuple[np.ndarray, ...]:
    """All pairs i < j with hamming(hashes[i], hashes[j]) <= max_distance -> (i, j, distance).

    Pairs come sorted by (i, j); i, j are int64, distance int16. ``method``: ``"mih"`` (multi-index
    hashing, see the module docstring), ``"brute"`` (:func:`near_pairs_brute`) or ``"auto"`` (mih for
    max_distance < 16). ``block`` bounds the work per vectorised step (candidate pairs for mih, rows
    for brute); both methods return the same pairs.
    """
    if method == "auto":
        method = "mih" if max_distance < BRUTE_MIN_DISTANCE else "brute"
    if method == "brute":
        return near_pairs_brute(hashes, max_distance, block)
    if method != "mih":
        raise ValueError(f"unknown method {method!r}")
    if not 0 <= max_distance < 64:
        raise ValueError(f"mih needs 0 <= max_distance < 64, got {max_distance}")
    hashes = np.asarray(hashes, dtype=np.uint64)
    block = DEFAULT_BLOCK if block is None else max(1, int(block))
    # 1. collapse identical hashes: candidates are searched among distinct values only
    uniq, inverse, counts = np.unique(hashes, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    ua, ub, ud = _mih_distinct(uniq, max_distance, block)
    # 2. expand: pairs of distinct values -> all their members; members of one value pair at distance 0
    members = np.argsort(inverse, kind="stable")  # original indices grouped by value, ascending
    first = np.cumsum(counts) - counts
    if len(uniq) == len(hashes):  # no identical hashes: one member each
        i, j, dist = members[ua], members[ub], ud
    else:
        n_out = counts[ua] * counts[ub]
        rep = np.repeat(np.arange(len(ua)), n_out)
        t = np.arange(int(n_out.sum()), dtype=np.int64) - np.repeat(np.cumsum(n_out) - n_out, n_out)
        cb = counts[ub][rep]
        i = members[first[ua][rep] + t // cb]
        j = members[first[ub][rep] + t % cb]
        dist = ud[rep]
        pos_end = (first + counts)[inverse[members]]  # end of each position's run in ``members``
        same_p, same_q = _pairs_after(pos_end - np.arange(len(members)) - 1)
        i = np.concatenate([i, members[same_p]])
        j = np.concatenate([j, members[same_q]])
        dist = np.concatenate([dist, np.zeros(len(same_p), np.int16)])
    lo, hi = np.minimum(i, j), np.maximum(i, j)
    order = np.lexsort((hi, lo))
    return lo[order].astype(np.int64), hi[order].astype(np.int64), dist[order].astype(np.int16)


def _mih_blocks(max_distance: int) -> list[tuple[np.uint64, np.uint64]]:
    """(shift, mask) of the ``max_distance + 1`` disjoint bit blocks covering the 64 bits."""
    k = max_distance + 1
    widths = [64 // k + (1 if b < 64 % k else 0) for b in range(k)]
    out, shift = [], 0
    for w in widths:
        out.append((np.uint64(shift), np.uint64((1 << w) - 1)))
        shift += w
    return out


def _mih_distinct(uniq: np.ndarray, max_distance: int, block: int) -> tuple[np.ndarray, ...]:
    """Pairs (a, b, distance) of indices into the distinct hashes ``uniq`` within ``max_distance``."""
    blocks = _mih_blocks(max_distance)
    m = len(uniq)
    out_a, out_b, out_d = [], [], []
    for b, (shift, mask) in enumerate(blocks):
        key = (uniq >> shift) & mask
        order = np.argsort(key, kind="stable")
        ks = key[order]
        us = uniq[order]  # the distinct hashes in this block's order: candidates are runs of equal ks
        new = np.ones(m, dtype=bool)
        new[1:] = ks[1:] != ks[:-1]
        starts = np.flatnonzero(new)
        ends = np.append(starts[1:], m)
        rem = ends[np.cumsum(new) - 1] - np.arange(m) - 1  # partners after each sorted position
        del key, ks, new, starts, ends
        for p, q in _pair_chunks(rem, block):
            x = us[p] ^ us[q]
            d = np.bitwise_count(x)
            keep = np.flatnonzero(d <= max_distance)
            a, c, x, d = order[p[keep]], order[q[keep]], x[keep], d[keep]
            if b:  # report a pair only in the first block it agrees on
                first = np.ones(len(x), dtype=bool)
                for s2, m2 in blocks[:b]:
                    first &= ((x >> s2) & m2) != 0
                a, c, d = a[first], c[first], d[first]
            out_a.append(a)
            out_b.append(c)
            out_d.append(d.astype(np.int16))
    if not out_a:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty.astype(np.int16)
    return (np.concatenate(out_a).astype(np.int64), np.concatenate(out_b).astype(np.int64),
            np.concatenate(out_d))


def _pair_chunks(rem: np.ndarray, block: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (p, q) position pairs, q in p+1 .. p+rem[p], about ``block`` pairs per chunk."""
    pos = np.flatnonzero(rem > 0)
    if not len(pos):
        return
    cnt = rem[pos].astype(np.int64)
    cum = np.cumsum(cnt)
    start = 0
    while start < len(pos):
        before = cum[start - 1] if start else 0
        stop = max(start + 1, int(np.searchsorted(cum, before + block, side="right")))
        yield _expand(pos[start:stop], cnt[start:stop])
        start = stop


def _pairs_after(rem: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All (p, q) with p < q <= p + rem[p], as two int64 arrays (ordered by p, then q)."""
    pos = np.flatnonzero(rem > 0)
    return _expand(pos, rem[pos].astype(np.int64))


def _expand(pos: np.ndarray, cnt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.repeat(pos.astype(np.int64), cnt)
    q = p + 1 + np.arange(len(p), dtype=np.int64) - np.repeat(np.cumsum(cnt) - cnt, cnt)
    return p, q


def near_pairs_brute(hashes: np.ndarray, max_distance: int, block: int | None = None) -> tuple[np.ndarray, ...]:
    """All-pairs reference for :func:`near_pairs`: a blocked, vectorised popcount over every pair.

    O(N^2) work (about 1.3 s at N = 20k, ~8 s at 50k, ~30 min at 700k) in O(block * N) memory,
    ``block`` rows at a time. Pairs come sorted by (i, j).
    """
    n = len(hashes)
    if block is None:
        block = max(1, min(n, 4_000_000 // max(n, 1)))
    out_i, out_j, out_d = [], [], []
    for start in range(0, n, block):
        stop = min(n, start + block)
        d = hamming(hashes[start:stop, None], hashes[None, :])
        ii, jj = np.nonzero(d <= max_distance)
        keep = jj > ii + start
        ii, jj = ii[keep], jj[keep]
        out_i.append(ii + start)
        out_j.append(jj)
        out_d.append(d[ii, jj])
    if not out_i:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty.astype(np.int16)
    return np.concatenate(out_i).astype(np.int64), np.concatenate(out_j).astype(np.int64), np.concatenate(out_d)


def groups(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Connected components of the graph with ``n`` nodes and edges (i, j): one id per node."""
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    graph = coo_matrix((np.ones(len(i), dtype=np.int8), (i, j)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    return labels.astype(np.int64)


def find_duplicates(table: pd.DataFrame, max_distance: int) -> tuple[pd.DataFrame, np.ndarray]:
    """Duplicate pairs and group ids for ``table`` (columns uid, split, phash, dhash, digest).

    Returns (pairs with DUP_COLUMNS, group id per row of ``table``).
    """
    return find_duplicates_arrays(table.uid.to_numpy(), table.split.to_numpy(), to_uint64(table.phash),
                                  to_uint64(table.dhash), table.digest.to_numpy(), max_distance)


def find_duplicates_arrays(uids: np.ndarray, splits: np.ndarray, ph: np.ndarray, dh: np.ndarray,
                           digests: np.ndarray, max_distance: int) -> tuple[pd.DataFrame, np.ndarray]:
    """:func:`find_duplicates` on parallel arrays: hashes as uint64, digests of any comparable dtype
    (e.g. fixed-width bytes ``S32``), so a caller with 500k images holds no Python object per hash."""
    if max_distance < 0 or max_distance > 64:
        raise ValueError(f"dup_max_distance must be in [0, 64], got {max_distance}")
    n = len(uids)
    i, j, dist = near_pairs(ph, max_distance)
    # identical pixels are duplicates whatever their pHash distance (always 0 in practice)
    ex_i, ex_j = _exact_pairs(digests)
    near_keys, ex_keys = i * n + j, ex_i * n + ex_j  # both ascending: (i, j) order
    at = np.minimum(np.searchsorted(near_keys, ex_keys), max(len(near_keys) - 1, 0))
    extra = ~(near_keys[at] == ex_keys) if len(near_keys) else np.ones(len(ex_keys), dtype=bool)
    if extra.any():
        i, j = np.concatenate([i, ex_i[extra]]), np.concatenate([j, ex_j[extra]])
        dist = np.concatenate([dist, hamming(ph[ex_i[extra]], ph[ex_j[extra]])])
        order = np.lexsort((j, i))
        i, j, dist = i[order], j[order], dist[order]
    pairs = pd.DataFrame({
        "a": uids[i], "b": uids[j], "split_a": splits[i], "split_b": splits[j], "distance": dist.astype(int),
        "dhash_distance": hamming(dh[i], dh[j]).astype(int),
        "kind": np.where(digests[i] == digests[j], "exact", "near"),
    }, columns=DUP_COLUMNS)
    return pairs, groups(n, i, j)


def _exact_pairs(digests: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All pairs i < j with equal digests (within each digest group), sorted by (i, j)."""
    codes, inverse = np.unique(digests, return_inverse=True)
    if len(codes) == len(digests):
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    inverse = inverse.reshape(-1)
    members = np.argsort(inverse, kind="stable")
    counts = np.bincount(inverse, minlength=len(codes))
    end = np.cumsum(counts)[inverse[members]]
    p, q = _pairs_after(end - np.arange(len(members)) - 1)
    i, j = members[p], members[q]
    order = np.lexsort((j, i))
    return i[order].astype(np.int64), j[order].astype(np.int64)


def pair_counts(pairs: pd.DataFrame) -> dict[str, int]:
    """Number of pairs per split pair: within_train, train_val, train_test, val_test, ..."""
    counts = {f"within_{s}": 0 for s in SPLIT_ORDER}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        counts[f"{a}_{b}"] = 0
    rank = {s: k for k, s in enumerate(SPLIT_ORDER)}
    for (sa, sb), n in pairs.groupby(["split_a", "split_b"]).size().items():
        a, b = sorted((sa, sb), key=lambda s: rank.get(s, 99))
        key = f"within_{a}" if a == b else f"{a}_{b}"
        counts[key] = counts.get(key, 0) + int(n)
    return counts


def dedup_report(pairs: pd.DataFrame, group_ids: np.ndarray, max_distance: int) -> dict:
    """Summary for the prepare report."""
    sizes = np.bincount(group_ids) if len(group_ids) else np.zeros(0, dtype=int)
    return {
        "max_distance": max_distance,
        "n_pairs": int(len(pairs)),
        "n_exact_pairs": int((pairs.kind == "exact").sum()),
        "n_near_pairs": int((pairs.kind == "near").sum()),
        "pairs": pair_counts(pairs),
        "n_groups_with_duplicates": int((sizes > 1).sum()),
        "n_images_in_duplicate_groups": int(sizes[sizes > 1].sum()),
        "largest_group": int(sizes.max()) if len(sizes) else 0,
    }
