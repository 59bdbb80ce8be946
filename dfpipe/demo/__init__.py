"""Deterministic demo dataset in the competition layout (``python -m dfpipe.demo data/raw``).

Layout written under ``root``::

    trainset/<md5>.jpg   trainset_label.txt           img_name,target (1 = fake)
    valset/<md5>.jpg     valset_label.txt
    testset/<md5>.jpg    (no testset_label.txt, as in the challenge)
    testset_label_private.txt                         the test labels "released after the challenge":
                                                      the pipeline never trains on them, it only uses
                                                      them to report test metrics
    demo_manifest.csv                                 how every image was made (split, kind, source, ...)
    dataset_card.json                                 {"demo": true, ...}: stage 1 records it, the ensemble
                                                      card carries it, the CLI, API and page warn about it

Real images are random crops / scales / flips / slight colour changes of the photographs bundled
with scikit-image and matplotlib (only those that load offline) and of procedurally rendered
scenes. Fakes are the same kind of images with ONE local manipulation (an irregular elliptical
region covering 15-40 % of the image, soft edge); the manipulation kinds differ per split so that
generalisation to an unseen kind can be measured:

* train: ``blend`` (region blended with a blurred / colour-shifted copy of itself), ``splice``
  (region pasted from another image with a colour mismatch);
* val: train kinds + ``warp`` (smooth local displacement field, ``cv2.remap``);
* test: val kinds + ``upsample`` (region down-sampled x3-x4 and nearest-neighbour up-sampled:
  blocky, generator-like artefacts); train never contains it.

Sizes, JPEG quality, sources, crops, colour jitter and sensor noise (added before the
manipulation, as a camera would) are drawn the same way for
real and fake images, so only the local manipulation tells the classes apart. File names are the
md5 of the JPEG bytes (they do not leak the label); label rows are sorted by name.

Determinism: every image has its own generator seeded from ``(seed, split, index)``; with the same
seed and the same library versions (numpy, OpenCV, the bundled sample images) every file is
byte-identical. The manipulations here are independent of :mod:`dfpipe.augment_sd` on purpose.
"""

from .dataset import (FAKE_KINDS, LABEL_FILES, MANIFEST, MANIPULATIONS, SPLIT_DIRS, auc_by_kind, main, make_demo_dataset,
                      make_image)
from .sources import BaseImage, build_sources, load_photos, render_scene, sample_real

__all__ = ["FAKE_KINDS", "LABEL_FILES", "MANIFEST", "MANIPULATIONS", "SPLIT_DIRS", "BaseImage", "auc_by_kind",
           "build_sources", "load_photos", "main", "make_demo_dataset", "make_image", "render_scene", "sample_real"]
