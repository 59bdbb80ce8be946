import numpy as np
import pytest
import skimage.data
from matplotlib import cbook
from PIL import Image

from conftest import photo_like
from dfpipe.config import PrepareConfig, from_dict, load_section
from dfpipe.data.faces import Box, apply_face_crop, crop_face, crop_window, get_detector, register_detector
from dfpipe.errors import ConfigError
from dfpipe.registry import FACE_DETECTORS


def _hopper() -> np.ndarray:
    return np.asarray(Image.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB"))


# approximate face centres (x, y) checked by eye on the bundled photographs
@pytest.mark.parametrize("image, centre", [(skimage.data.astronaut, (225, 115)), (_hopper, (265, 215))])
def test_haar_finds_the_face_and_the_crop_contains_its_centre(image, centre):
    img = image()
    boxes = get_detector("haar").detect(img)
    assert boxes, "no face found"
    best = max(boxes, key=lambda b: b.w * b.h)
    cx, cy = best.x + best.w / 2, best.y + best.h / 2
    assert abs(cx - centre[0]) < 40 and abs(cy - centre[1]) < 40, best
    x0, y0, side = crop_window(img.shape[:2], best, 1.3)
    assert x0 <= centre[0] < x0 + side and y0 <= centre[1] < y0 + side
    crop, res = apply_face_crop(img, "haar", 1.3, "whole")
    assert crop.shape[0] == crop.shape[1] == side and res.status == "found" and res.box == tuple(best[:4])


def test_large_image_is_searched_downscaled_with_boxes_in_original_pixels():
    img = skimage.data.astronaut()
    big = np.asarray(Image.fromarray(img).resize((1536, 1536), Image.BICUBIC))
    small_box = max(get_detector("haar").detect(img), key=lambda b: b.w * b.h)
    big_box = max(get_detector("haar").detect(big), key=lambda b: b.w * b.h)
    assert abs(big_box.x + big_box.w / 2 - 3 * (small_box.x + small_box.w / 2)) < 30
    assert big_box.w > 2 * small_box.w


@pytest.mark.parametrize("policy, status", [("whole", "none"), ("largest", "none"), ("skip", "skipped")])
def test_no_face_follows_the_policy(rng, policy, status):
    img = photo_like(rng, 120, 160)
    out, res = apply_face_crop(img, "haar", 1.3, policy)
    assert res.status == status and res.box == (-1, -1, -1, -1)
    if policy == "skip":
        assert out is None
    else:
        assert out is img


def test_off_is_a_no_op(rng):
    img = photo_like(rng)
    out, res = apply_face_crop(img, "none", 1.3, "skip")
    assert out is img and res.status == "off"


def test_crop_is_square_and_clipped_to_the_image():
    img = np.zeros((100, 200, 3), np.uint8)
    assert crop_face(img, (90, 40, 20, 20), 1.5).shape == (30, 30, 3)
    assert crop_window((100, 200), (90, 40, 20, 20), 1.5) == (85, 35, 30)
    assert crop_window((100, 200), (0, 0, 20, 20), 2.0) == (0, 0, 40)  # moved inside, not cut
    assert crop_window((100, 200), (180, 90, 20, 10), 2.0) == (160, 60, 40)
    assert crop_window((100, 200), (50, 10, 90, 90), 1.5) == (45, 0, 100)  # shrunk to the short side
    with pytest.raises(ValueError, match="margin"):
        crop_window((100, 200), (0, 0, 10, 10), 0)


class _Fake:
    def detect(self, img):
        return [Box(10, 10, 20, 20, 0.9), Box(40, 40, 40, 30, 0.5), Box(0, 50, 5, 5, 1.0)]


@pytest.fixture
def fake_detector():
    """``_Fake`` registered as the detector "fake" for one test (and unregistered after it)."""
    register_detector("fake", _Fake)
    yield "fake"
    FACE_DETECTORS.unregister("fake")


def test_pluggable_detector_and_several_faces_take_the_largest(fake_detector):
    img = np.zeros((100, 100, 3), np.uint8)
    out, res = apply_face_crop(img, fake_detector, 1.0, "whole")
    assert res.status == "largest_of_3" and res.box == (40, 40, 40, 30) and out.shape == (40, 40, 3)
    assert PrepareConfig(face_crop=fake_detector, face_policy="skip").face_crop == "fake"  # registered: accepted
    assert get_detector("fake") is get_detector("fake")  # built once per process
    with pytest.raises(KeyError, match="already registered"):
        register_detector("fake", _Fake)


def test_a_registered_detector_is_selectable_in_params(fake_detector, tmp_path):
    """No config edit: registering is enough for params.yaml to name it; unregistered, it is refused."""
    params = tmp_path / "params.yaml"
    params.write_text("prepare:\n  face_crop: fake\n")
    assert load_section(PrepareConfig, "prepare", params).face_crop == "fake"
    FACE_DETECTORS.unregister("fake")
    with pytest.raises(ConfigError, match=rf"{params}:prepare\.face_crop: 'fake' is not allowed; "
                                          r"choose one of \['none', 'haar'\]"):
        load_section(PrepareConfig, "prepare", params)
    with pytest.raises(ConfigError, match=r"'hars' is not allowed; choose one of \['none', 'haar'\] \(did you mean 'haar'\?\)"):
        from_dict(PrepareConfig, {"face_crop": "hars"}, "params.yaml:prepare")
    with pytest.raises(ValueError, match=r"unknown face detector 'fake'; choose one of \['haar'\]"):
        get_detector("fake")
