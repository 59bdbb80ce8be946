import numpy as np
import pandas as pd
import pytest

from dfpipe.split.cluster import assign_folds, check_split, cluster_ids, split_pool


def make_pool(rng, n_per_blob=12, n_blobs=4, n_aug=10):
    """Originals in well separated feature blobs (per class) plus generated images of some reals."""
    feats, labels, uids = [], [], []
    for b in range(n_blobs):
        centre = rng.normal(0, 10, 8)
        for i in range(n_per_blob):
            feats.append(centre + rng.normal(0, 0.1, 8))
            labels.append(b % 2)
            uids.append(f"train/b{b}_{i}.jpg")
    orig = pd.DataFrame({"uid": uids, "label": labels, "origin": "train", "source_uid": uids})
    reals = orig.uid[orig.label == 0].to_numpy()
    src = rng.choice(reals, n_aug)
    aug = pd.DataFrame({"uid": [f"aug/a{i}.png" for i in range(n_aug)], "label": 1, "origin": "aug",
                        "source_uid": src})
    return pd.concat([orig, aug], ignore_index=True), np.asarray(feats, np.float32)


def test_blobs_become_clusters_and_folds_hold_whole_clusters(rng):
    pool, feats = make_pool(rng)
    df = split_pool(pool, feats, n_clusters=2, per_class=True, n_folds=2, seed=0)
    orig = df[df.origin != "aug"]
    # each well separated blob is one cluster
    blob = orig.uid.str.extract(r"b(\d)_")[0]
    assert (orig.groupby(blob).cluster.nunique() == 1).all()
    assert orig.cluster.nunique() == 4
    # folds disjoint and covering, no cluster split, derived images share their source's fold
    assert set(df.fold) == {0, 1} and len(df) == len(pool) and not df.uid.duplicated().any()
    assert (df.groupby("cluster").fold.nunique() == 1).all()
    src_fold = df.set_index("uid").fold
    aug = df[df.origin == "aug"]
    assert (src_fold.loc[aug.source_uid].to_numpy() == aug.fold.to_numpy()).all()
    # both classes in each fold (stratified)
    assert (orig.groupby("fold").label.nunique() == 2).all()


def test_same_seed_same_split(rng):
    pool, feats = make_pool(rng)
    a = split_pool(pool, feats, 2, True, 2, seed=3)
    b = split_pool(pool, feats, 2, True, 2, seed=3)
    pd.testing.assert_frame_equal(a, b)


def test_per_class_clusters_never_mix_labels(rng):
    feats = rng.normal(size=(40, 4)).astype(np.float32)
    labels = np.repeat([0, 1], 20)
    ids = cluster_ids(feats, labels, k=3, per_class=True, seed=0)
    for c in np.unique(ids):
        assert len(np.unique(labels[ids == c])) == 1


def test_too_few_clusters_for_folds():
    with pytest.raises(ValueError, match="cannot fill 4 folds"):
        assign_folds(np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1]), 4, 0)


def test_check_split_catches_leaks():
    df = pd.DataFrame({"uid": ["a", "b", "c"], "source_uid": ["a", "b", "a"], "cluster": [0, 1, 0],
                       "fold": [0, 1, 1], "origin": ["train", "train", "aug"]})
    with pytest.raises(AssertionError, match="cluster spans two folds"):
        check_split(df)
    df.loc[2, "cluster"] = 2
    with pytest.raises(AssertionError, match="not in its source's fold"):
        check_split(df)


def test_near_duplicates_share_a_fold_even_across_clusters(rng):
    pool, feats = make_pool(rng)
    pool["dup_group"] = -1
    # a near-duplicate pair whose members sit in two different blobs (so two different clusters)
    a, b = pool.index[pool.uid == "train/b0_0.jpg"][0], pool.index[pool.uid == "train/b2_0.jpg"][0]
    pool.loc[[a, b], "dup_group"] = 7
    for seed in range(4):  # without the link, some seeds put the two blobs in different folds
        df = split_pool(pool, feats, n_clusters=2, per_class=True, n_folds=2, seed=seed)
        fold = df.set_index("uid").fold
        assert fold["train/b0_0.jpg"] == fold["train/b2_0.jpg"]
        assert (df.groupby("cluster").fold.nunique() == 1).all()


def test_fold_groups_join_clusters_linked_by_duplicates():
    from dfpipe.split.cluster import fold_groups

    clusters = np.array([0, 0, 1, 1, 2, 2])
    dups = np.array([-1, 5, 5, -1, -1, -1])  # links cluster 0 and 1
    units = fold_groups(clusters, dups)
    assert units[0] == units[2] and units[0] != units[4]
    assert len(np.unique(units)) == 2


def test_check_split_catches_split_near_duplicates():
    df = pd.DataFrame({"uid": ["a", "b"], "source_uid": ["a", "b"], "cluster": [0, 1], "fold": [0, 1],
                       "origin": ["train", "train"], "dup_group": [3, 3]})
    with pytest.raises(AssertionError, match="near-duplicates"):
        check_split(df)


def test_k_chosen_by_silhouette_is_the_number_of_blobs(rng):
    from dfpipe.split.cluster import choose_k

    pool, feats = make_pool(rng, n_per_blob=10, n_blobs=6)
    k, scores = choose_k(feats, [2, 4, 6, 8, 12], seed=0)
    assert k == 6 and set(scores) == {"2", "4", "6", "8", "12"}
    assert scores["6"] == max(scores.values())
    assert choose_k(feats, [2, 4, 6, 8, 12], seed=0) == (k, scores)  # same seed, same k and scores
    df = split_pool(pool, feats, n_clusters=0, per_class=False, n_folds=3, seed=0, k_candidates=[2, 4, 6, 8, 12])
    orig = df[df.origin != "aug"]
    assert orig.cluster.nunique() == 6
    assert (orig.groupby(orig.uid.str.extract(r"b(\d)_")[0]).cluster.nunique() == 1).all()


def test_k_chosen_per_class_and_candidates_clamped(rng):
    from dfpipe.split.cluster import choose_k, select_k

    pool, feats = make_pool(rng)  # 4 blobs, 2 per class
    labels = pool.label[pool.origin != "aug"].to_numpy()
    k, info = select_k(feats, labels, per_class=True, candidates=[2, 3, 4], seed=1)
    assert k == (2, 2) and info["per_class"]["real"]["k"] == 2
    ids = cluster_ids(feats, labels, k, per_class=True, seed=1)
    assert set(ids[labels == 0]) == {0, 1} and set(ids[labels == 1]) == {2, 3}
    k, scores = choose_k(feats[:5], [4, 6, 8, 12, 16], seed=0)  # 5 samples: candidates clamp to 4
    assert k == 4 and list(scores) == ["4"]
    assert choose_k(feats[:2], [4], seed=0) == (1, {})


def test_contact_sheet_has_one_row_per_cluster(tmp_path, rng):
    import cv2

    from dfpipe.split.stage import cluster_contact_sheet, contact_sheet_shape

    cache = tmp_path / "train.npy"
    np.save(cache, rng.integers(0, 255, (20, 40, 40, 3), dtype=np.uint8))
    uids = [f"train/{i}.jpg" for i in range(20)]
    pool = pd.DataFrame({"uid": uids, "cache_path": str(cache), "cache_index": np.arange(20)})
    df = pd.DataFrame({"uid": uids, "origin": "train", "label": np.arange(20) % 2,
                       "cluster": np.repeat([0, 1, 2], [10, 8, 2])})
    out = cluster_contact_sheet(pool, df, tmp_path / "sheet.png", per_cluster=4, seed=0)
    img = cv2.imread(str(out))
    assert img.shape[:2] == contact_sheet_shape(3, 4)
    assert not list(tmp_path.glob(".sheet.png.*"))  # no temp file left behind
