"""The Stable Diffusion path on tiny RANDOM-weight pipelines (real diffusers code, no downloads)."""

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import photo_like
from dfpipe.augment_sd import run as run_augment
from dfpipe.augment_sd.diffusion import (TINY_MODEL, generate, load_pipeline, native_size, placeholder_prompt_embeds,
                                      resolve_dtype, tiny_pipeline, work_size)
from dfpipe.augment_sd.generate import regenerate
from dfpipe.config import AugmentConfig, DiffusionConfig
from dfpipe.io import work_dir

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: tiny models, one thread

CFG = DiffusionConfig(model=TINY_MODEL, steps=2, strength=0.5, guidance_scale=5.0, batch_size=2)


@pytest.fixture(scope="module")
def pipes(one_torch_thread):
    return {mode: tiny_pipeline(mode) for mode in ("img2img", "inpaint")}


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [photo_like(rng, 64, 64) for _ in range(3)]


def ellipse_masks(n, size=64):
    yy, xx = np.mgrid[0:size, 0:size]
    m = (((xx - size / 2) / (size * 0.3)) ** 2 + ((yy - size / 2) / (size * 0.4)) ** 2 <= 1).astype(np.float32)
    return [m] * n


def run(pipe, imgs, seeds, mode, **kw):
    masks = ellipse_masks(len(imgs), imgs[0].shape[0]) if mode == "inpaint" else None
    return generate(pipe, imgs, masks, seeds, kw.pop("cfg", CFG), prompt_embeds=placeholder_prompt_embeds(pipe), **kw)


@pytest.mark.parametrize("mode", ["img2img", "inpaint"])
def test_generate_is_reproducible_per_seed(pipes, images, mode):
    pipe = pipes[mode]
    a = run(pipe, images, [1, 2, 3], mode)  # batch_size 2: batches of 2 and 1
    assert len(a) == 3
    for img, out in zip(images, a):
        assert out.shape == img.shape and out.dtype == np.uint8
        assert np.abs(out.astype(int) - img.astype(int)).mean() > 1.0  # the model really changed it
    b = run(pipe, images, [1, 2, 3], mode)
    assert all(x.tobytes() == y.tobytes() for x, y in zip(a, b))
    c = run(pipe, images, [1, 2, 4], mode)
    assert a[0].tobytes() == c[0].tobytes() and a[1].tobytes() == c[1].tobytes()
    assert a[2].tobytes() != c[2].tobytes()


def test_odd_sizes_are_resized_for_the_pipeline_and_back(pipes):
    rng = np.random.default_rng(1)
    imgs = [photo_like(rng, 60, 60), photo_like(rng, 60, 60)]
    out = run(pipes["img2img"], imgs, [0, 1], "img2img", size=44)  # runs at 48 x 48
    assert [o.shape for o in out] == [(60, 60, 3)] * 2
    odd = [photo_like(rng, 37, 53)]  # no side a multiple of 8: runs at 48 x 64, back to 37 x 53
    masks = [np.ones((37, 53), np.float32)]
    pe = placeholder_prompt_embeds(pipes["inpaint"])
    assert generate(pipes["inpaint"], odd, masks, [0], CFG, prompt_embeds=pe)[0].shape == (37, 53, 3)
    assert work_size(60, 60, None) == (64, 64) and work_size(160, 160, 512) == (512, 512)
    assert work_size(100, 50, 64) == (64, 32) and work_size(3, 3, None) == (8, 8)
    assert native_size(pipes["img2img"]) == 64


def test_generate_rejects_bad_arguments(pipes, images):
    pe = placeholder_prompt_embeds(pipes["img2img"])
    with pytest.raises(ValueError, match="one seed per image"):
        generate(pipes["img2img"], images, None, [1], CFG, prompt_embeds=pe)
    with pytest.raises(ValueError, match="mask per image"):
        generate(pipes["inpaint"], images, None, [1, 2, 3], CFG, prompt_embeds=pe)
    with pytest.raises(ValueError, match="no denoising step"):
        generate(pipes["img2img"], images, None, [1, 2, 3], DiffusionConfig(steps=2, strength=0.3), prompt_embeds=pe)
    with pytest.raises(ValueError, match="text encoder"):
        generate(pipes["img2img"], images, None, [1, 2, 3], CFG)


def test_load_pipeline_errors_name_the_model(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match="no_such_model.*does not exist"):
        load_pipeline(str(missing), "img2img", "float32", "cpu")
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_pipeline(str(tmp_path), "img2img", "float32", "cpu")  # a folder, but not a diffusers one
    with pytest.raises(FileNotFoundError, match="someorg/not-cached-model"):
        load_pipeline("someorg/not-cached-model", "inpaint", "float32", "cpu")  # offline: not in the cache
    with pytest.raises(ValueError, match="mode"):
        load_pipeline(TINY_MODEL, "outpaint")
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("float8", "cpu")
    assert resolve_dtype("auto", "cpu") == torch.float32


@pytest.mark.parametrize("mode", ["img2img", "inpaint"])
def test_local_folder_round_trip(pipes, images, tmp_path, mode):
    folder = tmp_path / f"tiny_{mode}"
    pipes[mode].save_pretrained(folder)
    loaded = load_pipeline(folder, mode, "float32", "cpu")
    assert type(loaded).__name__ == type(pipes[mode]).__name__ and loaded.safety_checker is None
    a, b = run(pipes[mode], images[:1], [5], mode), run(loaded, images[:1], [5], mode)
    assert a[0].tobytes() == b[0].tobytes()  # same weights, same seed: same image
    if mode == "inpaint":
        with pytest.raises(ValueError, match="inpainting model"):
            load_pipeline(folder, "img2img", "float32", "cpu")


def test_stage_with_tiny_inpainting_model(tmp_path):
    from test_augment import SIZES, layout, make_prepared, prepared_image, stored

    prepared = tmp_path / "prepared"
    prepared.mkdir()
    make_prepared(prepared)
    diff = DiffusionConfig(model=TINY_MODEL, mode="inpaint", steps=2, strength=1.0, batch_size=1, fraction=0.5,
                           per_image=2)
    cfg = AugmentConfig(fakes_per_real=0.5, methods={"self_blend": 1.0}, diffusion=diff)
    summary = run_augment(cfg, layout(prepared, tmp_path / "aug"))
    assert summary["n_diffusion"] == 6 and summary["by_method"] == {"sd_inpaint": 6, "self_blend": 3}
    out = tmp_path / "aug"
    man = pd.read_csv(out / "manifest.csv", keep_default_na=False)
    sd = man[man.method == "sd_inpaint"]
    assert (sd.label == 1).all() and (sd.mask_path != "").all() and sd.source_uid.nunique() == 3
    shapes = set()
    for _, row in sd.iterrows():
        assert json.loads(row.params)["model"] == TINY_MODEL
        fake, mask = regenerate(row, prepared)
        assert fake.tobytes() == stored(out, row).tobytes()  # batch_size 1: exact, and the store is lossless
        src = prepared_image(prepared, row.source_uid)
        assert fake.shape == src.shape and mask.shape == src.shape[:2]  # the source's own size, not 8-aligned
        shapes.add(src.shape[:2])
        assert 0.05 < (mask > 0).mean() < 0.9
        np.testing.assert_array_equal(fake[mask == 0], src[mask == 0])  # pasted back outside the mask
        assert np.abs(fake.astype(int) - src.astype(int))[mask == 1].mean() > 5
    assert len(shapes) >= 2 and shapes <= set(SIZES)


def test_mixed_sizes_in_one_batch_keep_their_shapes(pipes, monkeypatch):
    """A batch of differently shaped images: each runs at its own multiple-of-8 working size (sub-batches),
    none squashed to another's shape, each back at its exact shape; same result as alone in its batch group."""
    rng = np.random.default_rng(2)
    imgs = [photo_like(rng, 50, 90), photo_like(rng, 77, 61), photo_like(rng, 45, 81)]
    cfg = DiffusionConfig(model=TINY_MODEL, steps=2, strength=0.5, guidance_scale=5.0, batch_size=3)
    pe = placeholder_prompt_embeds(pipes["img2img"])
    calls = []
    real_call = type(pipes["img2img"]).__call__

    def spy(self, **kw):
        calls.append(kw["image"].shape)
        return real_call(self, **kw)

    pipe = pipes["img2img"]
    monkeypatch.setattr(type(pipe), "__call__", spy)
    out = generate(pipe, imgs, None, [1, 2, 3], cfg, prompt_embeds=pe)
    assert [o.shape for o in out] == [im.shape for im in imgs]
    # 50x90 and 45x81 share the working size 32x64 (longer side 64); 77x61 runs alone at 64x48
    assert sorted(calls) == sorted([(2, 32, 64, 3), (1, 64, 48, 3)])
    assert all(h % 8 == 0 and w % 8 == 0 for _, h, w, _ in calls)
    alone = generate(pipe, imgs[1:2], None, [2], cfg, prompt_embeds=pe)[0]
    assert alone.tobytes() == out[1].tobytes()  # its sub-batch held only itself


def test_stage_checks_the_diffusion_model_before_editing(tmp_path, caplog):
    from test_augment import layout, make_prepared

    prepared = tmp_path / "prepared"
    prepared.mkdir()
    make_prepared(prepared)
    lay = layout(prepared, tmp_path / "aug")
    with pytest.raises(FileNotFoundError, match="missing_sd15.*does not exist"):
        run_augment(AugmentConfig(methods={"self_blend": 1.0},
                                  diffusion=DiffusionConfig(model=str(tmp_path / "missing_sd15"))), lay)
    with pytest.raises(ValueError, match="strength"):
        run_augment(AugmentConfig(methods={"self_blend": 1.0},
                                  diffusion=DiffusionConfig(model=TINY_MODEL, strength=1.5)), lay)
    with pytest.raises(ValueError, match="mode"):
        run_augment(AugmentConfig(methods={"self_blend": 1.0},
                                  diffusion=DiffusionConfig(model=TINY_MODEL, mode="outpaint")), lay)
    assert not (tmp_path / "aug").exists() and not (tmp_path / "aug.tmp").exists()


# --------------------------------------------------------------------------- resume and shards with diffusion rows
SD_RUN = DiffusionConfig(model=TINY_MODEL, mode="inpaint", steps=2, strength=1.0, batch_size=2, fraction=0.5,
                         per_image=2)  # 3 sources x 2 = 6 diffusion rows in 3 batches of 2


def sd_config(**kw):
    base = dict(seed=3, fakes_per_real=0.5, methods={"self_blend": 1.0, "splice": 1.0}, real_widening=0.5,
                diffusion=SD_RUN, workers=1)
    return AugmentConfig(**{**base, **kw})


def sd_stage(prepared, out, **kw):
    """Stage 2 with diffusion rows from the store ``prepared`` into ``out``: its summary."""
    from test_augment import layout

    return run_augment(sd_config(**kw), layout(prepared, out))


@pytest.fixture(scope="module")
def sd_reference(tmp_path_factory, one_torch_thread):
    from test_augment import make_prepared

    root = tmp_path_factory.mktemp("sd_ref")
    prepared = root / "prepared"
    prepared.mkdir()
    make_prepared(prepared)
    summary = sd_stage(prepared, root / "aug")
    assert summary["n_images"] == 12 and summary["n_diffusion"] == 6
    return prepared, root / "aug"


def test_killed_diffusion_run_resumes_whole_batches(sd_reference, tmp_path, monkeypatch):
    from test_augment import Killed, counting, same_output

    prepared, ref = sd_reference
    out = tmp_path / "aug"
    counting(monkeypatch, "sd_batch", fail_after=4)  # batches 1 and 2 stored, killed in batch 3
    with pytest.raises(Killed):
        sd_stage(prepared, out)
    sd_files = sorted(work_dir(out).glob("sd_inpaint_*.npz"))
    assert len(sd_files) == 4 and len(list(work_dir(out).glob("*.npz"))) == 4 + 6
    # A kill between two images of one batch: that batch is remade whole (same composition, same bytes).
    sd_files[0].unlink()
    edits, sds = counting(monkeypatch, "edit_one"), counting(monkeypatch, "sd_batch")
    sd_stage(prepared, out)
    assert edits == [] and len(sds) == 2 + 2  # the broken batch and the missing one; the full batch is kept
    assert same_output(ref, out) and not work_dir(out).exists()


def test_diffusion_shards_merge_to_the_one_process_output(sd_reference, tmp_path):
    from test_augment import layout, run_ranks, same_output

    prepared, ref = sd_reference
    results = run_ranks(sd_config(), layout(prepared, tmp_path / "aug"), world=2)
    assert results[1] == {"rank": 1, "world": 2, "generated": 3 + 2}  # 3 of 6 editing images + batch 2 of 3
    assert same_output(ref, tmp_path / "aug")


def test_torchrun_two_processes_match_one(sd_reference, tmp_path):
    """The real thing on CPU: 2 processes, gloo process group via accelerate, merged output == 1 process."""
    from test_augment import same_output

    prepared, ref = sd_reference
    cfg = sd_config()
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"paths": {"prepared": str(prepared), "augmented": str(tmp_path / "aug")},
                                  "augment_sd": {**asdict(cfg), "diffusion": asdict(SD_RUN)}}))  # JSON is YAML
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}  # 1 thread, as the reference run
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "02_augment_sd.py", "--params", str(params)],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "process 1 of 2" in proc.stderr and "[rank 1/2]" in proc.stderr
    assert same_output(ref, tmp_path / "aug")
