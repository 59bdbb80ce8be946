"""What a model was trained on, said plainly: the dataset card of an input folder and stage 1's data card.

- ``dataset_card.json`` in an input data folder (``paths.data_root``, or a dataset's image folder): written by
  whoever made the data; ``python -m dfpipe.demo`` writes ``{"name": ..., "demo": true, ...}`` so that a model
  trained on its synthetic images is known as such all the way to the CLI, the API and the page.
- ``data_card.json`` in the image store (stage 1's output): whether the data is the demo's, the images per class
  and split, and a one-line summary; stage 5 copies it into the ensemble card (``training_data``, ``demo``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..io import write_json

log = logging.getLogger(__name__)

DATASET_CARD = "dataset_card.json"
DATA_CARD = "data_card.json"
DEMO_NAME = "the synthetic demo data"


def read_dataset_card(folder: str | Path) -> dict | None:
    """The dataset card of an input folder, or None when it has none (or an unreadable one: warned)."""
    path = Path(folder) / DATASET_CARD
    if not path.is_file():
        return None
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.warning("%s: unreadable dataset card, ignored (%s)", path, exc)
        return None
    return card if isinstance(card, dict) else None


def data_card(root: str | Path, cards: list[dict], counts: dict[str, dict[str, int]]) -> dict:
    """Stage 1's data card: ``counts`` is ``{split: {"real": n, "fake": n}}`` of the labelled images kept; ``cards``
    the dataset cards found in the inputs (any of them saying ``demo: true`` makes the data the demo's)."""
    demo = any(c.get("demo") is True for c in cards)
    names = sorted({str(c["name"]) for c in cards if c.get("name")})
    n_real = sum(c.get("real", 0) for c in counts.values())
    n_fake = sum(c.get("fake", 0) for c in counts.values())
    where = Path(root).name or str(root)
    what = DEMO_NAME if demo else ", ".join(names) or where
    return {"demo": demo, "root": where, "names": names, "n_real": n_real, "n_fake": n_fake, "by_split": counts,
            "summary": f"{n_real} real + {n_fake} fake images of {what}" + (f" ({where})" if what != where else "")}


def write_data_card(folder: str | Path, card: dict) -> None:
    write_json(Path(folder) / DATA_CARD, card)


def read_data_card(folder: str | Path) -> dict | None:
    """The data card of an image store; None for a store made before stage 1 wrote one."""
    path = Path(folder) / DATA_CARD
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("%s: unreadable data card, ignored (%s)", path, exc)
        return None
    return card if isinstance(card, dict) else None
