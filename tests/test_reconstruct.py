"""Reconstruction fakes (dfpipe.augment_sd.reconstruct): the models, pair parity, and stage 2 with them on."""

import io
import json
import shutil

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import layout_in, photo_like
from dfpipe.augment_sd import run as run_augment
from dfpipe.augment_sd.plan import RECON_REAL, plan_jobs
from dfpipe.augment_sd.reconstruct import METHODS, Context, Reconstructor, check_config, random_ae, reconstruct
from dfpipe.augment_sd.reconstruct import parity, stage
from dfpipe.augment_sd.reconstruct.parity import (Post, draw_post, encode, encode_jpeg_like, fake_bytes, fit,
                                                  jpeg_history, real_bytes)
from dfpipe.augment_sd.reconstruct.taesd import ASSETS, load_taef2
from dfpipe.augment_sd.reconstruct.vae import load_vae
from dfpipe.config import AugmentConfig, ReconstructConfig
from dfpipe.data.images import decode_image
from dfpipe.errors import ConfigError, DataError, InputError
from dfpipe.io import work_dir

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: small models, one thread


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255.0 ** 2 / np.mean((a.astype(np.float64) - b) ** 2)))


def smooth(rng, h=64, w=64):
    """A photo-like image without sensor noise (an autoencoder does not keep i.i.d. noise)."""
    return cv2.GaussianBlur(photo_like(rng, h, w), (5, 5), 1.0)


def jpeg(img, quality=75, subsampling=2):
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality, subsampling=subsampling)
    return buf.getvalue()


@pytest.fixture(scope="module")
def taef2():
    return METHODS["taef2"](ReconstructConfig(), Context())[0]


# --------------------------------------------------------------------------- models
def test_taef2_ships_its_weights_and_round_trips(taef2):
    rng = np.random.default_rng(0)
    imgs = [smooth(rng), smooth(rng, 37, 53)]  # 37 x 53: reflect-padded to 40 x 56 and cropped back
    out = reconstruct(taef2, imgs)
    assert [o.shape for o in out] == [i.shape for i in imgs] and out[0].dtype == np.uint8
    assert psnr(out[0], imgs[0]) > 25 and psnr(out[1], imgs[1]) > 25
    assert not np.array_equal(out[0], imgs[0])  # a reconstruction, not a copy
    assert reconstruct(taef2, imgs[:1])[0].tobytes() == out[0].tobytes()  # deterministic, batch or alone
    assert (ASSETS / "LICENSE").read_text().startswith("MIT License")
    n_params = sum(p.numel() for p in taef2.model.parameters())
    assert 2.0e6 < n_params < 3.5e6 and taef2.factor == 8


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="no native bfloat16 on this CPU")
def test_bfloat16_stays_within_a_level_of_float32(taef2):
    from dfpipe.augment_sd.reconstruct import resolve_dtype

    img = smooth(np.random.default_rng(9), 64, 64)
    a, b = reconstruct(taef2, [img], dtype="float32")[0], reconstruct(taef2, [img], dtype="bfloat16")[0]
    diff = np.abs(a.astype(int) - b)
    assert diff.mean() < 0.5 and diff.max() <= 8 and resolve_dtype("auto", "cpu") == "bfloat16"
    assert resolve_dtype("float32", "cpu") == "float32"


def test_taef2_refuses_changed_or_misfit_weights(tmp_path):
    for name in ("taef2_encoder.pth", "taef2_decoder.pth"):
        shutil.copy(ASSETS / name, tmp_path / name)
    data = bytearray((tmp_path / "taef2_decoder.pth").read_bytes())
    data[-100] ^= 1
    (tmp_path / "taef2_decoder.pth").write_bytes(bytes(data))
    with pytest.raises(DataError, match="taef2_decoder.pth: sha256"):
        load_taef2(tmp_path)
    state = torch.load(ASSETS / "taef2_decoder.pth", weights_only=True)
    state["1.weight"] = state["1.weight"][:, :16]  # a 16-channel latent: not the FLUX.2 layout
    torch.save(state, tmp_path / "taef2_decoder.pth")
    with pytest.raises(DataError, match="does not fit the TAESD FLUX.2 decoder"):
        load_taef2(tmp_path, check_sha256=False)
    with pytest.raises(InputError, match="not found"):
        load_taef2(tmp_path / "nowhere")


def test_random_ae_draws_differ_per_seed_and_repeat_for_one():
    archs = [random_ae.draw_arch(s) for s in range(40)]
    assert len(set(archs)) > 20
    assert {a.upsample for a in archs} == set(random_ae.UPSAMPLE)
    assert {a.norm for a in archs} == set(random_ae.NORM) and {a.depth for a in archs} == {2, 3}
    a, b, c = random_ae.build(3), random_ae.build(3), random_ae.build(4)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert a.arch != c.arch or any(not torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters()))
    for arch in {x.upsample: x for x in archs}.values():  # every up-sampling kind gives back the input shape
        x = torch.rand(2, 3, 32, 48)
        assert random_ae.RandomAE(arch)(x).shape == x.shape


def test_random_ae_training_lowers_the_loss_and_is_deterministic():
    rng = np.random.default_rng(1)
    patches = random_ae.crops([smooth(rng, 40, 56) for _ in range(4)], 32, seed=5)
    assert patches.shape == (4 * random_ae.CROPS_PER_IMAGE, 32, 32, 3)
    runs = []
    for _ in range(2):
        model = random_ae.build(7)
        losses = random_ae.train(model, patches, steps=60, batch=8, seed=7)
        runs.append((losses, model))
    losses = runs[0][0]
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(x, y) for x, y in zip(runs[0][1].state_dict().values(), runs[1][1].state_dict().values()))


def test_random_ae_models_are_cached(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    images = [smooth(rng, 48, 48) for _ in range(3)]
    r = ReconstructConfig(ae_models=2, ae_steps=5, ae_crop=32, ae_batch=4)
    ctx = Context(seed=1, train_images=lambda: images, cache_dir=tmp_path)
    first = METHODS["random_ae"](r, ctx)
    assert len(list(tmp_path.glob("random_ae_*.safetensors"))) == 2
    calls = []
    monkeypatch.setattr(random_ae, "train", lambda *a, **k: calls.append(1))
    again = METHODS["random_ae"](r, ctx)  # loaded, not trained
    assert not calls and [a.info for a in again] == [f.info for f in first]
    x = images[0]
    assert reconstruct(first[1], [x])[0].tobytes() == reconstruct(again[1], [x])[0].tobytes()


def tiny_vae(kind):
    from diffusers import AutoencoderKL, AutoencoderTiny

    torch.manual_seed(0)
    if kind == "kl":
        return AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8)
    return AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                           num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1), latent_channels=4)


@pytest.mark.parametrize("kind", ["kl", "tiny"])
def test_vae_from_a_local_diffusers_folder(tmp_path, kind):
    vae = tiny_vae(kind)
    folder = tmp_path / "pipe"
    vae.save_pretrained(folder / "vae")  # a pipeline folder's vae/ is found too
    model, factor = load_vae(folder)
    assert factor == 2
    rec = Reconstructor(model, factor, {})
    img = photo_like(np.random.default_rng(3), 30, 42)
    out = reconstruct(rec, [img])[0]
    assert out.shape == img.shape and out.dtype == np.uint8
    with torch.no_grad():  # the same as diffusers' own encode -> decode of the [-1, 1] image
        x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 127.5 - 1
        enc = vae.eval().encode(x)
        z = enc.latent_dist.mode() if kind == "kl" else enc.latents
        ref = ((vae.decode(z).sample + 1) / 2).clamp(0, 1)[0].permute(1, 2, 0).mul(255).round().byte().numpy()
    assert np.abs(out.astype(int) - ref).max() <= 1


def test_vae_from_taesd_weights_and_bad_folders(tmp_path, taef2):
    for name in ("taef2_encoder.pth", "taef2_decoder.pth"):
        shutil.copy(ASSETS / name, tmp_path / name)
    model, factor = load_vae(tmp_path)  # latent width and midblock branch read from the weights
    img = smooth(np.random.default_rng(4))
    assert reconstruct(Reconstructor(model, factor, {}), [img])[0].tobytes() == reconstruct(taef2, [img])[0].tobytes()
    with pytest.raises(InputError, match="vae_model is empty"):
        load_vae("")
    with pytest.raises(InputError, match="is not a folder"):
        load_vae(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="neither a diffusers VAE folder"):
        load_vae(tmp_path / "empty")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(DataError, match="is not one of"):
        load_vae(tmp_path / "other")


# --------------------------------------------------------------------------- parity
@pytest.mark.parametrize("quality,subsampling,grey", [(75, 2, False), (93, 0, False), (60, 1, False), (85, 2, True)])
def test_reconstruction_gets_its_reals_quantisation_tables(taef2, quality, subsampling, grey):
    img = smooth(np.random.default_rng(quality), 48, 64)
    pil = Image.fromarray(img).convert("L") if grey else Image.fromarray(img)
    buf = io.BytesIO()
    pil.save(buf, format="JPEG", quality=quality, subsampling=subsampling)
    raw = buf.getvalue()
    real = decode_image(raw)
    history = jpeg_history(raw)
    assert history.quality == quality and history.grey == grey
    made = reconstruct(taef2, [real])[0]
    data, used = fake_bytes(made, raw, Post())
    assert used == history
    back = jpeg_history(data)
    assert back.qtables == history.qtables and back.subsampling == history.subsampling and back.grey == grey
    assert decode_image(data).shape == real.shape
    assert jpeg_history(encode_jpeg_like(made, history)).qtables == history.qtables
    assert jpeg_history(cv2.imencode(".png", real)[1].tobytes()) is None


def test_post_draws_are_seeded_shared_and_leave_a_clean_share():
    r = ReconstructConfig(clean_share=0.4, resize_prob=0.5, webp_share=0.3)
    posts = [draw_post(s, r, 200, 300) for s in range(2000)]
    assert posts[7] == draw_post(7, r, 200, 300)
    clean = np.mean([p.clean for p in posts])
    assert 0.35 < clean < 0.45
    done = [p for p in posts if not p.clean]
    assert all(p.compress in ("jpeg", "webp") for p in done)
    assert 0.25 < np.mean([p.compress == "webp" for p in done]) < 0.35
    assert 0.45 < np.mean([p.resize is not None for p in done]) < 0.55
    q = [p.quality for p in done if p.compress == "jpeg"]
    assert min(q) >= 65 and max(q) <= 100
    big = draw_post(1, ReconstructConfig(max_side=100), 200, 300)
    assert big.fit == (67, 100) and big.new_real and fit(np.zeros((200, 300, 3), np.uint8), big).shape == (67, 100, 3)
    with pytest.raises(ConfigError, match="reconstruct.resize_range"):
        check_config(ReconstructConfig(resize_range=(0.5, 1.5)))
    with pytest.raises(ConfigError, match="reconstruct.jpeg_quality"):
        check_config(ReconstructConfig(jpeg_quality=(0, 90)))
    with pytest.raises(ConfigError, match=r"unknown method\(s\) \['taesd'\]"):
        check_config(ReconstructConfig(per_real=1.0, methods={"taesd": 1.0}))
    with pytest.raises(InputError, match="vae_model is empty"):
        check_config(ReconstructConfig(per_real=1.0, methods={"vae": 1.0}))


def file_features(data: bytes) -> np.ndarray:
    """What a file says without its pixels' content: format, quantisation tables, width and height."""
    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
        fmt = [im.format == f for f in ("JPEG", "WEBP", "PNG")]
        tables = np.zeros(3 * 64)
        if im.format == "JPEG":
            flat = np.concatenate([np.asarray(im.quantization[k]) for k in sorted(im.quantization)])
            tables[:len(flat)] = flat
    return np.r_[fmt, tables, w, h].astype(np.float64)


def cv_auc(features: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import GroupKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    scores = cross_val_predict(clf, features, labels, groups=groups, cv=GroupKFold(5), method="predict_proba")[:, 1]
    return float(roc_auc_score(labels, scores))


def test_a_classifier_on_tables_and_size_cannot_tell_the_pairs_apart():
    """Reals of many JPEG qualities and sizes; their fakes (a random autoencoder) get the stage's parity and
    post-processing. On the files' quantisation tables, format and size a cross-validated logistic
    regression scores AUC 0.5; without parity (the fake saved as PNG or at one quality) it scores near 1."""
    rng = np.random.default_rng(8)
    rec = Reconstructor(random_ae.build(0).eval(), random_ae.build(0).arch.factor, {})
    r = ReconstructConfig(max_side=80)
    feats, labels, groups, naive = [], [], [], []
    for i in range(60):
        h, w = int(rng.integers(40, 100)), int(rng.integers(40, 100))
        raw = jpeg(photo_like(rng, h, w), int(rng.integers(50, 101)), int(rng.choice([0, 2])))
        real = decode_image(raw)
        post = draw_post(i, r, h, w)
        made = reconstruct(rec, [fit(real, post)])[0]
        fake = fake_bytes(made, raw, post)[0]
        feats += [file_features(real_bytes(raw, real, post)), file_features(fake)]
        naive += [file_features(raw), file_features(encode(made, "jpeg", 95) if i % 2 else cv2.imencode(".png", made)[1].tobytes())]
        labels += [0, 1]
        groups += [i, i]
    labels, groups = np.array(labels), np.array(groups)
    auc = cv_auc(np.array(feats), labels, groups)
    assert abs(auc - 0.5) < 0.1, auc
    assert cv_auc(np.array(naive), labels, groups) > 0.9


# --------------------------------------------------------------------------- the stage
def jpeg_prepared(tmp_path, sizes=((60, 90), (96, 72), (70, 70), (88, 64), (130, 100))):
    """Stage 1 for real on JPEGs of several sizes and qualities (kept as their original bytes)."""
    from dfpipe.config import PrepareConfig
    from dfpipe.prepare_data import run as prepare

    rng = np.random.default_rng(11)
    raw = tmp_path / "raw"
    for split, folder in (("train", "trainset"), ("val", "valset")):
        names = []
        for i, (h, w) in enumerate(sizes):
            path = raw / folder / f"{split}_{i}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(jpeg(smooth(rng, h, w), quality=70 + 6 * i))
            names.append((f"{split}_{i}.jpg", 0 if i < 4 else 1))
        pd.DataFrame(names, columns=["img_name", "target"]).to_csv(raw / f"{folder}_label.txt", index=False)
    (raw / "testset").mkdir()
    (raw / "testset" / "t0.jpg").write_bytes(jpeg(smooth(rng, 50, 50)))
    prep = tmp_path / "prepared"
    prepare(PrepareConfig(workers=1), layout_in(tmp_path, data_root=raw, prepared=prep))
    return prep


RECON = ReconstructConfig(per_real=2.0, methods={"taef2": 1.0, "random_ae": 1.0}, max_side=90, clean_share=0.5,
                          ae_models=2, ae_steps=4, ae_crop=32, ae_batch=4, ae_train_images=4, batch_size=3)


def recon_config(**kw):
    base = dict(seed=5, fakes_per_real=0.5, methods={"self_blend": 1.0}, contact_sheet_per_method=1, workers=1,
                reconstruct=RECON)
    base.update(kw)
    return AugmentConfig(**base)


def recon_stage(prep, out, **kw):
    """Stage 2 with reconstruction from the store ``prep`` into ``out``: its summary."""
    return run_augment(recon_config(**kw), layout_in(out.parent, prepared=prep, augmented=out))


@pytest.fixture(scope="module")
def stage_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("recon")
    prep = jpeg_prepared(root)
    out = root / "aug"
    return prep, out, recon_stage(prep, out)


def test_stage_writes_pairs_with_provenance(stage_run):
    from dfpipe.augment_sd.sources import load_reals
    from dfpipe.data.store import StoreReader

    prep, out, summary = stage_run
    reals = load_reals(prep).set_index("uid")
    assert len(reals) == 8  # 4 train + 4 val reals
    man = pd.read_csv(out / "manifest.csv", keep_default_na=False)
    fakes = man[man.method.isin(["taef2", "random_ae"])]
    copies = man[man.method == RECON_REAL]
    assert len(fakes) == 16 and set(fakes.method) == {"taef2", "random_ae"} and (fakes.label == 1).all()
    assert (copies.label == 0).all() and 0 < len(copies) < 16 and (man.method == "self_blend").sum() == 4
    assert summary["n_reconstructed"] == 16 and summary["n_reconstruction_reals"] == len(copies)
    assert sorted(p.name for p in (out / "reconstruct").iterdir())[0].startswith("random_ae_0_")
    store = StoreReader()
    by_pair = {(r.source_uid, r.seed): r for r in copies.itertuples()}
    assert len(by_pair) == len(copies)
    n_clean = n_fit = 0
    for row in fakes.itertuples():
        p = json.loads(row.params)
        post = Post(**{**p["post"], "fit": tuple(p["post"]["fit"]) if p["post"]["fit"] else None})
        src = reals.loc[row.source_uid]
        raw = store.read(prep / src.cache_file, int(src.cache_index))
        fake = store.image(out / row.cache_file, int(row.cache_index))
        assert post == draw_post(row.seed, RECON, int(src.height), int(src.width))  # recorded = redrawn
        assert p["reconstruct"]["model"] == row.method
        if post.fit is None:  # the fake ends with its real's own JPEG tables
            assert p["parity"] == jpeg_history(raw).record()
        else:
            assert p["parity"] is None and max(fake.shape[:2]) <= 90
            n_fit += 1
        if post.new_real:  # its real: the next row, same source and seed, same size
            real = by_pair[(row.source_uid, row.seed)]
            assert real.Index == row.Index + 1 and json.loads(real.params)["post"] == p["post"]
            assert store.image(out / real.cache_file, int(real.cache_index)).shape == fake.shape
        else:
            assert (row.source_uid, row.seed) not in by_pair
            assert fake.shape == decode_image(raw).shape
            if row.method == "taef2":  # (the test's random autoencoders train 4 steps: far from the real)
                assert 25 < psnr(fake, decode_image(raw)) < 60
            n_clean += 1
    assert n_clean > 0 and n_fit > 0


def test_stage_pairs_stay_in_their_sources_fold(stage_run):
    from dfpipe.cluster_split.cluster import attach_generated
    from dfpipe.data.samples import load_pool

    prep, out, _ = stage_run
    pool = load_pool(prep, out)
    orig = pool[pool.origin != "aug"].assign(fold=lambda d: np.arange(len(d)) % 5, cluster=0)
    kept, dropped = attach_generated(orig, pool[pool.origin == "aug"], val_fold=0)
    assert len(dropped) == 0
    pairs = kept[kept.method.isin(["taef2", "random_ae", RECON_REAL])]
    assert (pairs.groupby("source_uid").fold.nunique() == 1).all()
    assert (pairs.fold.to_numpy() == orig.set_index("uid").fold.loc[pairs.source_uid].to_numpy()).all()


def same_output(a, b):
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    return all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


class Killed(Exception):
    pass


def test_stage_is_deterministic_and_resumes_after_a_kill(stage_run, tmp_path, monkeypatch):
    prep, ref, _ = stage_run
    out = tmp_path / "aug"
    real_fakes, real_train = stage.recon_fakes, random_ae.train
    batches, trained = [], []

    def killing(*args, **kwargs):
        if len(batches) == 2:
            raise Killed("simulated kill")
        batches.append(len(args[1]))
        return real_fakes(*args, **kwargs)

    monkeypatch.setattr(stage, "recon_fakes", killing)
    monkeypatch.setattr(random_ae, "train", lambda *a, **k: trained.append(1) or real_train(*a, **k))
    with pytest.raises(Killed):
        recon_stage(prep, out)
    assert not out.exists() and len(trained) == 2
    n_work = len(list(work_dir(out).glob("*.npz")))
    assert n_work == 4 + len(pd.read_csv(ref / "manifest.csv").query("method == @RECON_REAL")) + sum(batches)
    monkeypatch.setattr(stage, "recon_fakes", real_fakes)
    recon_stage(prep, out)
    assert len(trained) == 2  # the random autoencoders were cached in the work dir, not trained again
    assert same_output(ref, out) and not work_dir(out).exists()


def test_reconstruction_leaves_the_other_rows_unchanged(stage_run, tmp_path):
    prep, on, _ = stage_run
    off = tmp_path / "off"
    summary = recon_stage(prep, off, reconstruct=ReconstructConfig())
    assert "n_reconstructed" not in summary and not (off / "reconstruct").exists()
    a = pd.read_csv(on / "manifest.csv", keep_default_na=False)
    b = pd.read_csv(off / "manifest.csv", keep_default_na=False)
    assert a.head(len(b)).drop(columns="cache_index").equals(b.drop(columns="cache_index"))
    jobs_off = plan_jobs(recon_config(reconstruct=ReconstructConfig()), 8)
    assert plan_jobs(recon_config(), 8, [(64, 64)] * 8)[:len(jobs_off)] == jobs_off
    with pytest.raises(ValueError, match="size of every real"):
        plan_jobs(recon_config(), 8)


def test_worker_processes_give_the_same_bytes(stage_run, tmp_path, monkeypatch):
    prep, ref, _ = stage_run
    monkeypatch.setattr(stage, "MIN_IMAGES_PER_WORKER", 1)
    assert stage.n_processes(2, 28, 1, "cpu") == 2 and stage.n_processes(2, 28, 1, "cuda") == 1
    out = tmp_path / "pool"
    recon_stage(prep, out, workers=2)
    assert same_output(ref, out)


def test_rows_regenerate_from_the_manifest(stage_run):
    from dfpipe.augment_sd.generate import regenerate
    from dfpipe.data.store import StoreReader

    prep, out, _ = stage_run
    man = pd.read_csv(out / "manifest.csv", keep_default_na=False)
    for _, row in man[man.method.isin([RECON_REAL, "taef2"])].iterrows():
        img, mask = regenerate(row, prep)
        stored = StoreReader().image(out / row.cache_file, int(row.cache_index))
        assert mask is None and img.shape == stored.shape
        if row.method == RECON_REAL:
            assert img.tobytes() == stored.tobytes()
        else:  # the stage ran batches of 3, regenerate runs alone: equal up to float batch effects
            assert np.abs(img.astype(int) - stored).mean() < 0.5
    with pytest.raises(ConfigError, match="random_ae row cannot be regenerated"):
        regenerate(man[man.method == "random_ae"].iloc[0], prep)
