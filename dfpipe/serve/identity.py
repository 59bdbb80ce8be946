"""The model's identity as the CLI, the API and the page show it: which ensemble, trained on what, from which
commit, and whether it is a demo model (trained on the synthetic demo data: its scores mean nothing).

Read from the ensemble card alone (stage 5 writes ``demo``, ``training_data`` and ``commit`` into it:
:mod:`dfpipe.ensemble_predict.provenance`), before any model loads. A card made before those fields existed
reads as unknown: not treated as a demo model, and said to be unknown."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .service import model_id, read_card

DEMO_WARNING = "this model was trained on the synthetic demo data: its scores say nothing about real fakes"
UNKNOWN = "unknown"


@dataclass(frozen=True)
class Identity:
    id: str  # expert names @ card digest (service.model_id)
    n_experts: int
    demo: bool | None  # None: the card does not say (made before stage 5 recorded it)
    trained_on: str  # one line: images per class and which data, or "unknown"
    commit: str  # 12 hex digits (+ "-dirty"), or "unknown"

    @property
    def warning(self) -> str | None:
        return DEMO_WARNING if self.demo else None

    def fields(self) -> dict:
        """What every scoring response of the API carries: ``model``, ``demo``, ``warning``."""
        return {"model": self.id, "demo": self.demo, "warning": self.warning}

    @property
    def header(self) -> str:
        """The page's title line: ``2 models · trained on 240 real + 240 fake images of ... · commit 6eb7c0d1a2b3``."""
        models = f"{self.n_experts} model{'s' if self.n_experts != 1 else ''}"
        return f"{models} · trained on {self.trained_on} · commit {self.commit}"


def card_identity(card: str | Path) -> Identity:
    """The :class:`Identity` of an ensemble card; a ServeError naming the card when it is missing or not a card."""
    raw, names = read_card(card)
    data = raw.get("training_data")
    demo = raw.get("demo")
    summary = data.get("summary") if isinstance(data, dict) else None
    return Identity(model_id(card, names), len(names), demo if isinstance(demo, bool) else None,
                    str(summary) if summary else UNKNOWN, str(raw.get("commit") or UNKNOWN))


def ensemble_identity(card: str | Path, names: list[str]) -> Identity:
    """:func:`card_identity`, or an unknown identity when the ensemble was given without its card file (tests, a
    client that builds one in code)."""
    if Path(card).is_file():
        return card_identity(card)
    return Identity(model_id(card, names), len(names), None, UNKNOWN, UNKNOWN)
