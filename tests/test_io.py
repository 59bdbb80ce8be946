"""dfpipe.io's atomic writes: unique temp names beside the target, the mode a plain open gives (0644 under the
usual umask, never mkstemp's 0600), nothing left behind on failure."""

from __future__ import annotations

import os
import threading

import pandas as pd
import pytest
import torch

from dfpipe.io import atomic_path, save_torch, umask, write_csv, write_json


@pytest.fixture
def set_umask():
    old = os.umask(0o022)
    yield lambda m: os.umask(m)
    os.umask(old)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_outputs_get_the_mode_of_a_plain_open(tmp_path, set_umask, mask, mode):
    set_umask(mask)
    assert umask() == mask and umask() == mask  # reading it does not change it
    write_json(tmp_path / "card.json", {"a": 1})
    write_csv(tmp_path / "manifest.csv", pd.DataFrame({"a": [1]}))
    save_torch({"w": torch.zeros(2)}, tmp_path / "best.pt")
    with open(tmp_path / "plain", "w"):
        pass
    for name in ("card.json", "manifest.csv", "best.pt", "plain"):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode, name


def test_two_writers_of_one_file_never_share_a_temp_name(tmp_path):
    """Two runs writing the same output at once each get their own temp file; the last rename wins whole."""
    target = tmp_path / "out.json"
    seen, both_open = [], threading.Barrier(2)

    def write(k: int) -> None:
        with atomic_path(target) as tmp:
            seen.append(tmp)
            tmp.write_text(str(k) * 1000)
            both_open.wait(timeout=10)  # both temp files exist at the same time

    threads = [threading.Thread(target=write, args=(k,)) for k in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(seen)) == 2 and all(p.parent == tmp_path and p.name.startswith(".out.json.") for p in seen)
    assert target.read_text() in {"1" * 1000, "2" * 1000}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    write_json(tmp_path / "m.json", {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "m.json") as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert (tmp_path / "m.json").read_text().startswith("{") and [p.name for p in tmp_path.iterdir()] == ["m.json"]
