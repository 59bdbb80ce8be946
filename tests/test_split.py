import numpy as np
import pandas as pd
import pytest

from dfpipe.data.store import write_png_shard
from dfpipe.errors import ConfigError
from dfpipe.cluster_split.cluster import assign_folds, check_split, cluster_ids, split_pool


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
    with pytest.raises(ConfigError,
                       match="cannot fill 4 folds: raise cluster_split.n_clusters or lower cluster_split.n_folds"):
        assign_folds(np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1]), 4, 0)


def test_folds_are_balanced_on_skewed_clusters():
    # mixed-label clusters of very different sizes, as joint k-means gives on real data: stratifying
    # by label (the former StratifiedGroupKFold) put up to 510 of 1400 images in one fold
    sizes = [300, 250, 200, 150, 120, 100, 80, 60, 50, 40, 30, 20]
    fake_share = [0.5, 0.3, 0.6, 0.4, 0.9, 0.1, 0.5, 0.5, 0.2, 0.7, 0.5, 0.5]
    clusters = np.repeat(np.arange(12), sizes)
    labels = np.concatenate([np.arange(n) < round(f * n) for n, f in zip(sizes, fake_share)]).astype(int)
    for seed in range(4):
        folds = assign_folds(clusters, labels, 5, seed)
        n, n_fake = np.bincount(folds, minlength=5), np.bincount(folds, weights=labels, minlength=5)
        assert (np.abs(n - 1400 / 5) <= 0.1 * 1400 / 5).all(), (seed, n)
        assert (np.abs(n_fake - labels.sum() / 5) <= 0.25 * labels.sum() / 5).all(), (seed, n_fake)
        assert (pd.Series(folds).groupby(clusters).nunique() == 1).all()  # clusters stay whole
        np.testing.assert_array_equal(folds, assign_folds(clusters, labels, 5, seed))  # deterministic


def test_per_class_clusters_give_every_fold_both_classes():
    sizes = [300, 250, 200, 150, 120, 100, 200, 150, 100, 80, 60, 40]  # six real clusters, six fake ones
    clusters, labels = np.repeat(np.arange(12), sizes), np.repeat([0] * 6 + [1] * 6, sizes)
    for seed in range(4):
        folds = assign_folds(clusters, labels, 5, seed)
        assert (pd.Series(labels).groupby(folds).nunique() == 2).all()
        assert np.bincount(folds).max() <= 1.25 * len(folds) / 5


def test_equal_folds_keep_both_classes_and_the_seed_picks_the_val_fold():
    clusters, labels = np.repeat(np.arange(4), 12), np.repeat([0, 1, 0, 1], 12)
    held = set()
    for seed in range(6):
        folds = assign_folds(clusters, labels, 2, seed)
        assert (pd.Series(labels).groupby(folds).nunique() == 2).all()  # not both real clusters in one fold
        held.add(tuple(folds[::12]))
    assert len(held) > 1  # the seed decides which clusters fold 0 holds


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


def test_near_duplicate_groups_move_to_their_majority_cluster():
    from dfpipe.cluster_split.cluster import settle_near_duplicates

    clusters = np.array([0, 0, 1, 1, 1, 2, 2, 3])
    dups = np.array([4, -1, 4, 4, 9, 9, -1, 8])  # group 4: 1x cluster 0, 2x cluster 1; group 9: a 1-1 tie
    moved, n_spanning = settle_near_duplicates(clusters, dups)
    assert moved.tolist() == [1, 0, 1, 1, 1, 1, 2, 3] and n_spanning == 2  # the tie goes to cluster 1 (smaller)
    assert clusters.tolist() == [0, 0, 1, 1, 1, 2, 2, 3]  # input untouched
    same, n = settle_near_duplicates(clusters, None)  # no dup_group column: nothing moves
    assert same.tolist() == clusters.tolist() and n == 0


def test_a_duplicate_group_spanning_every_cluster_does_not_collapse_the_folds(rng):
    from dfpipe.cluster_split.cluster import cluster_report

    pool, feats = make_pool(rng)
    pool["dup_group"] = -1
    members = ["train/b0_0.jpg", "train/b1_0.jpg", "train/b2_0.jpg", "train/b2_1.jpg", "train/b3_0.jpg"]
    pool.loc[pool.uid.isin(members), "dup_group"] = 3  # one group in all four blobs, two of it in blob 2
    # joining the clusters the group touches (the former rule) left one unit: "cannot fill 4 folds"
    df = split_pool(pool, feats, n_clusters=2, per_class=True, n_folds=4, seed=0)
    check_split(df)
    orig = df[df.origin != "aug"].set_index("uid")
    assert sorted(orig.fold.value_counts()) == [11, 11, 11, 15]  # four folds; blob 2's took the three others
    assert orig.cluster.loc[members].nunique() == 1 and orig.cluster[members[0]] == orig.cluster["train/b2_5.jpg"]
    assert orig.fold.loc[members].nunique() == 1
    rep = cluster_report(df, 0)["near_duplicates"]
    assert rep == {"n_groups": 1, "n_spanning_clusters": 1, "n_moved": 3}


def test_check_split_catches_split_near_duplicates():
    df = pd.DataFrame({"uid": ["a", "b"], "source_uid": ["a", "b"], "cluster": [0, 1], "fold": [0, 1],
                       "origin": ["train", "train"], "dup_group": [3, 3]})
    with pytest.raises(AssertionError, match="near-duplicates"):
        check_split(df)
    df.loc[1, "dup_group"] = 4
    check_split(df)


def test_check_split_catches_donor_leaks():
    # a training splice (fold 1) whose donor "v" is in the val fold 0
    df = pd.DataFrame({"uid": ["v", "t", "u", "x"], "source_uid": ["v", "t", "u", "t"],
                       "donor_uid": ["", "", "", "v"], "cluster": [0, 1, 2, 1], "fold": [0, 1, 2, 1],
                       "origin": ["train", "train", "train", "aug"]})
    with pytest.raises(AssertionError, match="donor is in another fold"):
        check_split(df, val_fold=0)
    with pytest.raises(AssertionError, match="donor is in another fold"):
        check_split(df)  # no val fold named: any cross-fold donor leaks
    df.loc[3, "donor_uid"] = "u"  # donor in fold 2: both train when fold 0 is val
    check_split(df, val_fold=0)
    with pytest.raises(AssertionError, match="donor is in another fold"):
        check_split(df, val_fold=2)
    df.loc[3, "donor_uid"] = "gone"
    with pytest.raises(AssertionError, match="donor is not in the split"):
        check_split(df, val_fold=0)


def test_a_donor_in_another_fold_takes_its_fake_out_of_the_split(rng):
    from dfpipe.cluster_split.cluster import cluster_report

    pool, feats = make_pool(rng, n_aug=0)
    folds = split_pool(pool, feats, n_clusters=2, per_class=True, n_folds=3, seed=0).groupby("fold").uid.apply(list)
    (v, _), (t1, t1b), (t2, _) = (folds[f][:2] for f in range(3))  # originals of folds 0 (val), 1 and 2
    fakes = pd.DataFrame([  # uid, source, donor ("" = none)
        ("aug/leak_in.png", t1, v),  # a training splice with val pixels
        ("aug/leak_out.png", v, t1),  # a val splice made of training pixels
        ("aug/same.png", t1, t1b),  # donor in its source's fold
        ("aug/train_pair.png", t1, t2),  # both training folds: harmless while fold 0 is val
        ("aug/plain.png", v, ""),
    ], columns=["uid", "source_uid", "donor_uid"]).assign(label=1, origin="aug", method="splice")
    pool = pd.concat([pool.assign(donor_uid=""), fakes], ignore_index=True)

    df = split_pool(pool, feats, n_clusters=2, per_class=True, n_folds=3, seed=0, val_fold=0)
    check_split(df, val_fold=0)
    assert set(df.uid[df.origin == "aug"]) == {"aug/same.png", "aug/train_pair.png", "aug/plain.png"}
    fold = df.set_index("uid").fold
    train = df[(df.fold != 0) & (df.origin == "aug")]
    assert len(train) == 2 and not (fold.loc[train.source_uid] == 0).any() and not (fold.loc[train.donor_uid] == 0).any()
    dropped = pool[~pool.uid.isin(df.uid)]
    rep = cluster_report(df, 0, dropped)["generated_dropped_for_donor_leak"]
    assert rep["n"] == 2 and rep["by_method"] == {"splice": 2}
    # no val fold named: every cross-fold donor goes, whatever fold later becomes val
    strict = split_pool(pool, feats, n_clusters=2, per_class=True, n_folds=3, seed=0)
    check_split(strict)
    assert set(strict.uid[strict.origin == "aug"]) == {"aug/same.png", "aug/plain.png"}


def test_val_fold_outside_the_folds_is_a_config_error(rng):
    pool, feats = make_pool(rng)
    with pytest.raises(ConfigError, match="cluster_split.val_fold 2 is not a fold"):
        split_pool(pool, feats, n_clusters=2, per_class=True, n_folds=2, seed=0, val_fold=2)


def test_k_chosen_by_silhouette_is_the_number_of_blobs(rng):
    from dfpipe.cluster_split.cluster import choose_k

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
    from dfpipe.cluster_split.cluster import choose_k, select_k

    pool, feats = make_pool(rng)  # 4 blobs, 2 per class
    labels = pool.label[pool.origin != "aug"].to_numpy()
    k, info = select_k(feats, labels, per_class=True, candidates=[2, 3, 4], seed=1)
    assert k == (2, 2) and info["per_class"]["real"]["k"] == 2
    ids = cluster_ids(feats, labels, k, per_class=True, seed=1)
    assert set(ids[labels == 0]) == {0, 1} and set(ids[labels == 1]) == {2, 3}
    k, scores = choose_k(feats[:5], [4, 6, 8, 12, 16], seed=0)  # 5 samples: candidates clamp to 4
    assert k == 4 and list(scores) == ["4"]
    assert choose_k(feats[:2], [4], seed=0) == (1, {})


def test_contact_sheet_has_one_row_per_cluster_a_legend_and_the_val_fold_marked(tmp_path, rng):
    """Under a legend (what red and blue borders and the highlighted label mean), a row per cluster; the label
    cell of each val-fold cluster is highlighted, the others are not. (Before: no legend, no fold, no marking.)"""
    import cv2

    from dfpipe.cluster_split.pictures import (SHEET_GAP, SHEET_HEADER_H, SHEET_LABEL_W, SHEET_THUMB, VAL_BGR,
                                               cluster_contact_sheet, contact_sheet_shape)

    cache = tmp_path / "train-000000.bin"
    write_png_shard(cache, [rng.integers(0, 255, (40, 30 + i, 3), dtype=np.uint8) for i in range(20)])
    uids = [f"train/{i}.jpg" for i in range(20)]
    pool = pd.DataFrame({"uid": uids, "cache_path": str(cache), "cache_index": np.arange(20)})
    cluster = np.repeat([0, 1, 2], [10, 8, 2])
    df = pd.DataFrame({"uid": uids, "origin": "train", "label": np.arange(20) % 2, "cluster": cluster,
                       "fold": np.array([1, 0, 1])[cluster]})
    out = cluster_contact_sheet(pool, df, tmp_path / "sheet.png", per_cluster=4, seed=0, val_fold=0)
    img = cv2.imread(str(out))
    assert img.shape[:2] == contact_sheet_shape(3, 4)
    assert not list(tmp_path.glob(".sheet.png.*"))  # no temp file left behind
    header = img[:SHEET_HEADER_H]
    for colour in ((0, 0, 255), (255, 0, 0), VAL_BGR):  # the legend's swatches: fake, real, val fold
        assert np.all(header == colour, axis=2).sum() > 20, colour
    assert (header < 100).all(axis=2).sum() > 50  # and its words
    cell = SHEET_THUMB + SHEET_GAP
    marked = [np.all(img[SHEET_HEADER_H + SHEET_GAP + r * cell:][:SHEET_THUMB, :SHEET_LABEL_W] == VAL_BGR,
                     axis=2).mean() > 0.3 for r in range(3)]
    assert marked == [False, True, False]


def test_pca_picture_has_legends_and_rings_the_val_fold(rng):
    """The PCA figure names every cluster and its fold in a legend (the val one as such), has a legend by label,
    and rings exactly the val fold's points on both panels."""
    from dfpipe.cluster_split.pictures import embedding_figure

    cluster = np.repeat([0, 1, 2, 3], 6)
    orig = pd.DataFrame({"cluster": cluster, "label": np.arange(24) % 2, "fold": np.array([1, 0, 1, 2])[cluster]})
    xy = rng.normal(size=(24, 2))
    fig = embedding_figure(xy, orig, val_fold=0)
    by_cluster, by_label = fig.axes
    names = [t.get_text() for t in by_cluster.get_legend().get_texts()]
    assert names == ["0: fold 1", "1: fold 0 = val", "2: fold 1", "3: fold 2"]
    labels = [t.get_text() for t in by_label.get_legend().get_texts()]
    assert labels == ["real (12)", "fake (12)", "ringed: val fold 0 (6 originals)"]
    for ax in (by_cluster, by_label):
        rings = [c for c in ax.collections if len(c.get_facecolors()) == 0]
        assert len(rings) == 1 and np.allclose(rings[0].get_offsets(), xy[cluster == 1])


# --------------------------------------------------------------------------- embedders, streaming, k-means engines
TINY = "test_efficientnet"  # timm's 0.1M-parameter test net: random init ("none"), fast on CPU


def blobs(rng, n_blobs=4, per_blob=60, dim=16):
    centres = rng.normal(0, 10, (n_blobs, dim))
    truth = np.repeat(np.arange(n_blobs), per_blob)
    return (centres[truth] + rng.normal(0, 0.3, (len(truth), dim))).astype(np.float16), truth


def same_partition(a, b):
    """Cluster ids a and b group the samples identically (ids may be permuted)."""
    return len(set(zip(a.tolist(), b.tolist()))) == len(np.unique(a)) == len(np.unique(b))


def image_pool(tmp_path, rng, n=20, size=32, name="train"):
    """n uint8 images in a store shard (reals dark, fakes bright noise) and a pool over them."""
    imgs = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    labels = np.arange(n) % 2
    imgs[labels == 0] //= 4
    cache = tmp_path / f"{name}-000000.bin"
    write_png_shard(cache, list(imgs))
    uids = [f"{name}/{i}.png" for i in range(n)]
    return pd.DataFrame({"uid": uids, "img_name": [f"{i}.png" for i in range(n)], "label": labels,
                         "origin": name, "cache_path": str(cache), "cache_index": np.arange(n)})


def tiny_model(seed=0):
    import torch

    from dfpipe.cluster_split.embed import load_backbone

    return load_backbone(TINY, "none", torch.device("cpu"), seed=seed)


def test_random_init_embedder_is_the_same_on_every_run_and_leaves_the_global_rng_alone():
    """pretrained: none draws the weights from cluster_split.seed: stage 3's folds do not change from run to run."""
    import torch

    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a, b, c = tiny_model(0), tiny_model(0), tiny_model(1)
    assert torch.equal(torch.rand(1), before)  # the global generator did not move
    for (_, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb)
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.state_dict().values(), c.state_dict().values()))


def test_streamed_features_equal_in_memory_ones_and_are_indexed(tmp_path, rng):
    import torch

    from dfpipe.cluster_split.embed import embed_pool, embed_to_file, write_index
    from dfpipe.cluster_split.features import FeatureFile

    pool = image_pool(tmp_path, rng, n=11)
    model = tiny_model()
    mem = embed_pool(pool, TINY, "none", 32, batch_size=4, workers=0, model=model)  # 3 batches, last one short
    n, d = embed_to_file(pool, model, 32, 4, tmp_path / "f.npy", workers=0, index_path=tmp_path / "f.csv")
    disk = FeatureFile(tmp_path / "f.npy")
    assert disk.dtype == np.float16 and disk.shape == mem.shape == (n, d) == (11, 256)
    np.testing.assert_array_equal(np.asarray(disk), mem)
    np.testing.assert_array_equal(np.load(tmp_path / "f.npy"), mem)  # a plain .npy file
    np.testing.assert_allclose(np.linalg.norm(mem.astype(np.float32), axis=1), 1, atol=2e-3)
    # row i really is image i: embed image 7 alone
    one = embed_pool(pool.iloc[[7]], TINY, "none", 32, batch_size=1, workers=0, model=model)
    np.testing.assert_allclose(one[0].astype(np.float32), disk[7].astype(np.float32), atol=2e-3)
    index = pd.read_csv(tmp_path / "f.csv")  # written by the same call: the rows it embedded
    assert index.row.tolist() == list(range(11)) and index.uid.tolist() == pool.uid.tolist()
    assert index.columns.tolist() == ["row", "uid", "img_name", "label", "origin"]
    write_index(pool, tmp_path / "g.csv")  # what stage 3 wrote apart before
    assert (tmp_path / "g.csv").read_bytes() == (tmp_path / "f.csv").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.csv", "f.npy", "g.csv", "train-000000.bin",
                                                          "train-000000.idx.npy"]  # no temp files
    assert not torch.is_inference_mode_enabled()  # the generator leaves inference mode between batches


def test_embedding_decoded_in_worker_processes_equals_in_process(tmp_path, rng):
    from dfpipe.data.decode_pool import store_batches
    from dfpipe.data.preprocess import InputPolicy
    from dfpipe.cluster_split.embed import embed_pool

    pool = image_pool(tmp_path, rng, n=13)
    model = tiny_model()
    here = embed_pool(pool, TINY, "none", 32, batch_size=4, workers=0, model=model)
    np.testing.assert_array_equal(embed_pool(pool, TINY, "none", 32, batch_size=4, workers=2, model=model), here)
    policy = InputPolicy("resize", 16)
    args = (pool.cache_path.to_numpy(), pool.cache_index.to_numpy(), policy, 5)
    a, b = list(store_batches(*args, workers=0)), list(store_batches(*args, workers=2))
    assert [x.shape for x in a] == [(5, 16, 16, 3), (5, 16, 16, 3), (3, 16, 16, 3)] and a[0].dtype == np.uint8
    assert all(np.array_equal(x, y) for x, y in zip(a, b)) and len(a) == len(b)


def test_feature_file_reads_rows_like_the_array(tmp_path, rng, monkeypatch):
    from dfpipe.errors import DataError
    from dfpipe.cluster_split import features
    from dfpipe.cluster_split.features import FeatureFile, FeatureWriter

    monkeypatch.setattr(features, "BLOCK_BYTES", 3 * 10 * 2)  # an index selection is read 3 rows at a time
    a = rng.normal(size=(50, 10)).astype(np.float16)
    with open(tmp_path / "f.npy", "wb") as fh:
        w = FeatureWriter(fh, len(a))
        for s in range(0, len(a), 7):
            w.write(a[s:s + 7])
        assert w.close() == (50, 10)
    np.save(tmp_path / "saved.npy", a)
    assert (tmp_path / "f.npy").read_bytes() == (tmp_path / "saved.npy").read_bytes()  # np.save's bytes
    f = FeatureFile(tmp_path / "f.npy")
    assert (len(f), f.shape, f.dtype) == (50, (50, 10), np.float16)
    idx = np.array([49, 3, 3, -1, 0, 17, 18, 40, 2])  # unsorted, repeated, negative
    for key in (7, -2, slice(None), slice(5, 23), slice(40, 80), slice(30, 10), slice(1, 40, 4), idx,
                idx[:0], a[:, 0] > 0, np.flatnonzero(a[:, 1] > 0)):
        np.testing.assert_array_equal(f[key], a[key])
    np.testing.assert_array_equal(np.asarray(f, dtype=np.float32), a.astype(np.float32))
    with pytest.raises(IndexError):
        f[np.array([50])]
    with pytest.raises(RuntimeError, match="wrote 7 of 9"):
        with open(tmp_path / "g.npy", "wb") as fh:
            w = FeatureWriter(fh, 9)
            w.write(a[:7])
            w.close()
    (tmp_path / "cut.npy").write_bytes((tmp_path / "f.npy").read_bytes()[:-5])
    with pytest.raises(DataError, match="cut short"):
        FeatureFile(tmp_path / "cut.npy")


def test_checkpoint_embedder_loads_any_timm_model_from_a_local_file(tmp_path, rng):
    import torch

    from dfpipe.cluster_split.embed import embed_pool, load_backbone

    pool = image_pool(tmp_path, rng, n=6)
    source = tiny_model(seed=3)
    torch.save(source.state_dict(), tmp_path / "tiny.pth")
    loaded = load_backbone(TINY, str(tmp_path / "tiny.pth"), torch.device("cpu"))
    a = embed_pool(pool, TINY, "none", 32, 3, workers=0, model=source)
    b = embed_pool(pool, TINY, str(tmp_path / "tiny.pth"), 32, 3, workers=0, model=loaded)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, embed_pool(pool, TINY, "none", 32, 3, workers=0, model=tiny_model(seed=4)))


def test_finetuned_embedder_learns_the_labels_and_is_seeded(tmp_path, rng):
    import torch

    from dfpipe.cluster_split.embed import embed_pool
    from dfpipe.cluster_split.finetune import finetune_embedder

    pool = image_pool(tmp_path, rng, n=24)
    model, hist = finetune_embedder(pool, TINY, "none", 32, batch_size=8, epochs=2, lr=5e-3, seed=0, workers=0)
    assert [h["epoch"] for h in hist] == [0, 1]
    assert hist[0]["loss"] < 0.75  # zero-initialised head: starts near log 2
    assert hist[-1]["loss"] < 0.45 and hist[-1]["train_acc"] >= 0.9  # it learnt the labels
    assert not model.training and model.get_classifier().__class__.__name__ == "Identity"
    feats = embed_pool(pool, TINY, "none", 32, 16, workers=0, model=model)
    assert feats.shape == (24, 256) and np.isfinite(feats).all()
    twice, _ = finetune_embedder(pool, TINY, "none", 32, batch_size=8, epochs=2, lr=5e-3, seed=0, workers=0)
    other, _ = finetune_embedder(pool, TINY, "none", 32, batch_size=8, epochs=1, lr=5e-3, seed=1, workers=0)
    sd = [m.state_dict() for m in (model, twice, other)]
    assert all(torch.equal(sd[0][k], sd[1][k]) for k in sd[0])  # same seed, same weights
    assert not all(torch.equal(sd[0][k], sd[2][k]) for k in sd[0])


def test_finetune_needs_both_classes(tmp_path, rng):
    from dfpipe.cluster_split.finetune import finetune_embedder

    pool = image_pool(tmp_path, rng, n=8)
    with pytest.raises(ValueError, match="real and fake"):
        finetune_embedder(pool[pool.label == 1], TINY, "none", 32, 4, 1, 1e-3, seed=0, workers=0)


@pytest.mark.parametrize("engine", ["minibatch", "torch"])
def test_kmeans_engines_recover_blobs_deterministically_from_a_memmap(tmp_path, rng, monkeypatch, engine):
    from dfpipe.cluster_split import features as chunked, kmeans
    from dfpipe.cluster_split.features import FeatureFile

    monkeypatch.setattr(kmeans, "INIT_SAMPLE", 100)  # < n: the chunked path starts from a sample
    monkeypatch.setattr(chunked, "READ_ROWS", 64)  # several chunks (both engines read through features.iter_chunks)
    eng = kmeans.KMeansEngine(minibatch_above=50) if engine == "minibatch" else kmeans.KMeansEngine("torch")
    feats, truth = blobs(rng)
    assert [s for s, _ in chunked.iter_chunks(feats, None)] == [0, 64, 128, 192]
    np.save(tmp_path / "f.npy", feats)
    mm = np.load(tmp_path / "f.npy", mmap_mode="r")
    labels = kmeans.kmeans_labels(mm, 4, seed=0, engine=eng)
    assert labels.shape == (240,) and same_partition(labels, truth)
    np.testing.assert_array_equal(labels, kmeans.kmeans_labels(mm, 4, seed=0, engine=eng))  # same seed
    np.testing.assert_array_equal(labels, kmeans.kmeans_labels(feats, 4, seed=0, engine=eng))  # array == memmap
    ff = FeatureFile(tmp_path / "f.npy")  # stage 3's reader: chunked file reads give the same result
    np.testing.assert_array_equal(labels, kmeans.kmeans_labels(ff, 4, seed=0, engine=eng))
    rows = np.flatnonzero(truth >= 2)  # a subset, as per-class clustering reads it
    sub = kmeans.kmeans_labels(mm, 2, seed=0, rows=rows, engine=eng)
    assert same_partition(sub, truth[rows])
    np.testing.assert_array_equal(sub, kmeans.kmeans_labels(ff, 2, seed=0, rows=rows, engine=eng))
    assert kmeans.kmeans_labels(mm, 1, seed=0, engine=eng).tolist() == [0] * 240


def test_split_from_the_features_file_equals_the_split_in_memory(tmp_path, rng):
    from dfpipe.cluster_split.features import FeatureFile

    pool, feats = make_pool(rng)
    np.save(tmp_path / "f.npy", feats)
    for k, per_class in ((0, False), (2, True)):  # k chosen by silhouette (sampled rows), and per class
        a = split_pool(pool, FeatureFile(tmp_path / "f.npy"), k, per_class, n_folds=2, seed=1)
        pd.testing.assert_frame_equal(a, split_pool(pool, feats, k, per_class, n_folds=2, seed=1))


def test_torch_engine_splits_like_sklearn_on_blobs(rng):
    from dfpipe.cluster_split.kmeans import KMeansEngine

    pool, feats = make_pool(rng)
    a = split_pool(pool, feats, n_clusters=2, per_class=True, n_folds=2, seed=0, engine=KMeansEngine("torch"))
    b = split_pool(pool, feats, n_clusters=2, per_class=True, n_folds=2, seed=0)
    assert same_partition(a.cluster.to_numpy(), b.cluster.to_numpy())
    check_split(a)


def test_sampled_silhouette_is_sklearns_silhouette_score(rng):
    from sklearn.metrics import silhouette_score

    from dfpipe.cluster_split.cluster import sampled_silhouette

    feats, truth = blobs(rng)
    labels = (truth + rng.integers(0, 2, len(truth))) % 4  # some noise, so the score is not ~1
    x = feats.astype(np.float32)
    for size in (50, 0):
        want = silhouette_score(x, labels, sample_size=size or None, random_state=5)
        assert sampled_silhouette(feats, None, labels, size, seed=5) == pytest.approx(want, abs=1e-6)


def test_make_engine_resolves_auto_by_cuda(monkeypatch):
    import torch

    from dfpipe.cluster_split.kmeans import make_engine

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert (make_engine("auto").backend, make_engine("torch").device) == ("sklearn", "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert (make_engine("auto").backend, make_engine("auto").device) == ("torch", "cuda")
    assert make_engine("sklearn", 7).minibatch_above == 7
    with pytest.raises(ValueError, match="k-means backend"):
        make_engine("faiss")


def write_prepared(tmp_path, rng, n_train=24, n_val=8, n_aug=6):
    """A stage-1 + stage-2 output in miniature: manifests and image-store shards."""
    prep, aug = tmp_path / "prepared", tmp_path / "augmented"
    prep.mkdir()
    aug.mkdir()
    rows = []
    for split, n in (("train", n_train), ("val", n_val)):
        p = image_pool(prep, rng, n=n, name=split)
        rows.append(p.assign(split=split, cache_file=f"{split}-000000.bin", dup_group=-1))
    man = pd.concat(rows, ignore_index=True)
    man[["uid", "img_name", "split", "label", "cache_file", "cache_index", "dup_group"]].to_csv(
        prep / "manifest.csv", index=False)
    a = image_pool(aug, rng, n=n_aug, name="images")
    reals = man.uid[man.label == 0].to_numpy()
    pd.DataFrame({"uid": [f"aug/{i}.png" for i in range(n_aug)], "img_name": [f"{i}.png" for i in range(n_aug)],
                  "label": 1, "source_uid": reals[:n_aug], "donor_uid": reals[n_aug:2 * n_aug], "method": "splice",
                  "cache_file": "images-000000.bin", "cache_index": a.cache_index}).to_csv(aug / "manifest.csv",
                                                                                           index=False)
    return prep, aug


def test_run_split_with_finetuned_embedder_and_torch_kmeans(tmp_path, rng):
    import json

    import cv2

    from conftest import layout_in
    from dfpipe.config import SplitConfig
    from dfpipe.cluster_split import run as run_split
    from dfpipe.cluster_split.pictures import VAL_BGR, contact_sheet_shape

    prep, aug = write_prepared(tmp_path, rng)
    out = tmp_path / "out"
    layout = layout_in(tmp_path, prepared=prep, augmented=aug, splits=out / "splits.csv",
                       cluster_report=out / "report.json", features=out / "f.npy", features_index=out / "f.csv",
                       cluster_plot=out / "pca.png", cluster_examples=out / "sheet.png")
    cfg = SplitConfig(embedder="finetune", backbone=TINY, pretrained="none",
                      img_size=32, batch_size=8, finetune_epochs=1, finetune_batch_size=8, kmeans_backend="torch",
                      n_clusters=2, per_class=False, n_folds=2, contact_sheet_per_cluster=2)
    df = run_split(cfg, layout)
    check_split(df, val_fold=0)
    report = json.loads((out / "report.json").read_text())
    n_dropped = report["generated_dropped_for_donor_leak"]["n"]
    assert len(df) + n_dropped == 24 + 8 + 6 and set(df.fold) == {0, 1}
    table = pd.read_csv(layout.splits, keep_default_na=False)
    check_split(table, val_fold=0)  # splits.csv alone holds what the leak check needs (donors too)
    assert (table.donor_uid[table.origin == "aug"] != "").all() and len(table) == len(df)
    assert sum(f["n_original"] for f in report["folds"].values()) == 32
    feats, index = np.load(layout.features), pd.read_csv(layout.features_index)
    assert feats.shape == (32, 256) and index.uid.tolist() == df.uid[df.origin != "aug"].tolist()
    ft = report["embedding"]["finetune"]
    assert report["embedding"]["embedder"] == "finetune" and ft["n_images"] == 24 and len(ft["history"]) == 1
    assert report["kmeans"]["backend"] == "torch"
    # the PCA picture and the contact sheet go where the layout names them (no longer derived from the report)
    for picture in (out / "pca.png", out / "sheet.png"):
        assert cv2.imread(str(picture)) is not None, picture
    sheet = cv2.imread(str(out / "sheet.png"))  # the val fold's clusters are marked
    assert sheet.shape[:2] == contact_sheet_shape(2, 2) and np.all(sheet == VAL_BGR, axis=2).sum() > 1000
    assert sorted(p.name for p in out.iterdir()) == ["f.csv", "f.npy", "pca.png", "report.json", "sheet.png",
                                                     "splits.csv"]


def test_unknown_embedder_is_rejected(tmp_path):
    from dfpipe.config import SplitConfig
    from dfpipe.cluster_split.pipeline import build_embedder

    with pytest.raises(ValueError, match="cluster_split.embedder"):
        build_embedder(SplitConfig(embedder="clip"), pd.DataFrame())
