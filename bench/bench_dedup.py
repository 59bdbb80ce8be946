"""Benchmark near-duplicate pairing (stage 1's dedup) on CPU: seconds and peak memory at several sizes.

    python bench/bench_dedup.py --out reports/bench/bench_dedup.json [--at 50000,200000,700000 --brute-at 50000]

For each size N in --at, a fresh process (so each size gets its own ``ru_maxrss``) draws N uniformly
random 64-bit pHashes (seeded) and plants near-duplicates: N/100 copies of random earlier hashes with
0..d bits flipped (d = --max-distance, cycling through the distances) which must all be found, and
N/200 copies at d + 1 bits which must not be. A block of --giant identical hashes (a blank image
repeated) is added too. It then times

* ``near_pairs``: :func:`dfpipe.data.dedup.near_pairs` (multi-index hashing), and
* ``find_duplicates``: :func:`dfpipe.data.dedup.find_duplicates_arrays` end to end, as stage 1 calls
  it (uid strings, 32-byte digests, the pairs DataFrame and the connected components),

and checks the pairs: every planted pair found, no d + 1 plant found, every reported distance right,
the giant block in one group. At the sizes in --brute-at the former all-pairs implementation
(``near_pairs_brute``) is timed too and its pairs must equal the new ones exactly.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import dfpipe  # noqa: E402,F401  (its import sets the offline env vars: dfpipe.OFFLINE_ENV)

# One size, in a child process so that ru_maxrss is this size's peak.
CHILD = """
import json, resource, sys, time
import numpy as np
sys.path.insert(0, sys.argv[2] + "/bench")
from bench_dedup import make_hashes
from dfpipe.data.dedup import find_duplicates_arrays, groups, hamming, near_pairs, near_pairs_brute
a = json.loads(sys.argv[1])
n, d = a["n"], a["max_distance"]
ph, planted, far, giant = make_hashes(n, d, a["giant"], a["seed"])
mb = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
res = {"n": int(len(ph)), "n_planted": int(len(planted)), "n_planted_far": int(len(far)), "giant": a["giant"],
       "rss_after_data_mb": mb()}
t0 = time.perf_counter()
i, j, dist = near_pairs(ph, d)
res["near_pairs_seconds"] = time.perf_counter() - t0
res["near_pairs_peak_rss_mb"] = mb()
res["pairs_found"] = int(len(i))
found = set((i.astype(np.int64) << 32 | j).tolist())
key = lambda p: ((p[:, 0].astype(np.int64) << 32) | p[:, 1]).tolist()
res["planted_found"] = int(sum(k in found for k in key(planted)))
res["all_planted_found"] = res["planted_found"] == len(planted)
res["far_found"] = int(sum(k in found for k in key(far)))
res["distances_ok"] = bool((dist == hamming(ph[i], ph[j])).all() and (dist <= d).all())
res["sorted_unique"] = bool(len(i) < 2 or (np.diff(i * len(ph) + j) > 0).all())
res["giant_one_group"] = bool(len(set(groups(len(ph), i, j)[giant].tolist())) == 1)
if a["brute"]:
    t0 = time.perf_counter()
    bi, bj, bd = near_pairs_brute(ph, d)
    res["brute_seconds"] = time.perf_counter() - t0
    res["brute_identical"] = bool(np.array_equal(bi, i) and np.array_equal(bj, j) and np.array_equal(bd, dist))
    del bi, bj, bd
del found
rng = np.random.default_rng(a["seed"] + 1)
uids = np.array([f"train/{k:07d}.jpg" for k in range(len(ph))], dtype=object)
splits = np.array(["train", "val", "test"], dtype=object)[rng.integers(0, 3, len(ph))]
dh = rng.integers(0, 2**64, len(ph), dtype=np.uint64, endpoint=False)
digests = np.char.encode(np.char.mod("%032x", ph), "ascii")  # same pixels <=> same pHash here
t0 = time.perf_counter()
pairs, gid = find_duplicates_arrays(uids, splits, ph, dh, digests, d)
res["find_duplicates_seconds"] = time.perf_counter() - t0
res["find_duplicates_peak_rss_mb"] = mb()
res["find_duplicates_pairs"] = int(len(pairs))
res["find_duplicates_exact_pairs"] = int((pairs.kind == "exact").sum())
print(json.dumps(res))
"""


def make_hashes(n: int, max_distance: int, giant: int, seed: int = 0):
    """(hashes, planted pairs (k, 2), far pairs (k, 2), indices of the giant block) for ``n`` hashes.

    The hashes are random except ``n // 100`` near copies (distance 0..max_distance), ``n // 200``
    far copies (distance max_distance + 1) and ``giant`` copies of one value, shuffled in.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    n_near, n_far = n // 100, n // 200
    n_rand = n - n_near - n_far - giant
    h = rng.integers(0, 2**64, n, dtype=np.uint64, endpoint=False)
    src = rng.choice(n_rand, n_near + n_far, replace=False)
    dists = np.concatenate([np.arange(n_near) % (max_distance + 1), np.full(n_far, max_distance + 1)])
    for k, (s, dist) in enumerate(zip(src, dists)):
        bits = rng.choice(64, int(dist), replace=False).astype(np.uint64)
        h[n_rand + k] = h[s] ^ np.bitwise_or.reduce(np.uint64(1) << bits, initial=np.uint64(0))
    if giant:
        h[n - giant:] = h[n - giant]  # one fresh random value, repeated
    perm = rng.permutation(n)  # perm[new] = old
    where = np.empty(n, dtype=np.int64)
    where[perm] = np.arange(n)  # old -> new
    h = h[perm]
    pairs = np.sort(np.stack([where[src], where[n_rand + np.arange(n_near + n_far)]], axis=1), axis=1)
    giant_idx = where[np.arange(n - giant, n)]
    return h, pairs[:n_near], pairs[n_near:], giant_idx


def run_size(args: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args), str(REPO)], cwd=REPO, env=env,
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--at", default="50000,200000,700000", help="comma-separated numbers of hashes")
    ap.add_argument("--brute-at", default="50000", help="sizes also run through the old all-pairs search ('' = none)")
    ap.add_argument("--max-distance", type=int, default=4, help="prepare_data.dup_max_distance")
    ap.add_argument("--giant", type=int, default=2000, help="identical hashes planted (a blank image repeated)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    sizes = [int(s) for s in args.at.split(",")]
    brute = {int(s) for s in args.brute_at.split(",") if s}
    import numpy as np

    result: dict = {"max_distance": args.max_distance, "giant": args.giant, "cpus": os.cpu_count(),
                    "machine": platform.machine(), "processor": platform.processor(), "system": platform.system(),
                    "python": platform.python_version(), "numpy": np.__version__, "method": "mih", "runs": {}}
    for n in sizes:
        res = run_size({"n": n, "max_distance": args.max_distance, "giant": args.giant, "seed": args.seed,
                        "brute": n in brute})
        result["runs"][str(n)] = res
        print(f"{n} hashes: {res}", file=sys.stderr)
    runs = result["runs"].values()
    result["all_ok"] = all(r["all_planted_found"] and r["far_found"] == 0 and r["distances_ok"] and r["sorted_unique"]
                           and r["giant_one_group"] and r.get("brute_identical", True) for r in runs)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(json.dumps(result, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
