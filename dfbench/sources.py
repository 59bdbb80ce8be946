"""The benchmark's sources: each folder of ``../shared/data`` as a training part and a held-out part, split by
group (a person, a fake and its real) so no group is on both sides; the per-source training cap."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from dfpipe.errors import InputError


# ----------------------------------------------------------------------------- sources
@dataclass(frozen=True)
class Source:
    """A labelled source of ``../shared/data``: its training part and its held-out part.

    Each part has columns ``img_name`` (relative to ``root``), ``label`` and ``group``: the images that must stay on
    one side of any split (:func:`source_groups`; ``grouping`` names the rule)."""

    name: str
    train: pd.DataFrame  # img_name (relative to root), label, group
    heldout: pd.DataFrame  # img_name, label, group: the in-source column
    cross: pd.DataFrame  # img_name, label, group: what other sources' cells are evaluated on
    root: Path
    grouping: str = "image"  # the rule of the group column: image | identity | pairs (GROUPINGS)


def _folder_items(root: Path) -> pd.DataFrame:
    """``real/**`` = 0, ``fake/**`` = 1, listed as stage 6 lists a folder set."""
    from dfpipe.evaluate import list_class_folders

    if not ((root / "real").is_dir() or (root / "fake").is_dir()):
        raise InputError(f"{root}: no images under real/ or fake/")
    return list_class_folders(root.name, root)


# What must stay on one side of a split, per source layout (chosen by load_source from the folder's files):
GROUPINGS = {
    "image": "each image alone (the competition layout: its own trainset / valset split)",
    "identity": "real/NNN_03 and real/NNN_08 are one person (genphotos_frll); any other file alone",
    "pairs": "a fake and the real it was made from (pairs.csv: fake,real; dfdc_faces); a file in no pair alone",
}
PAIRS_FILE = "pairs.csv"  # fake,real: one row per fake, names relative to the source folder

_SAME_PERSON = re.compile(r"^(\d+)_(03|08)$")  # genphotos_frll: NNN_03 (neutral) and NNN_08 (smiling)


def identity_group(img_name: str) -> str:
    """``real/001_03.jpg`` and ``real/001_08.jpg`` -> ``real/001`` (one person, never on both sides of a
    split); any other file is a group of its own."""
    p = Path(img_name)
    m = _SAME_PERSON.match(p.stem)
    return f"{p.parent.as_posix()}/{m.group(1) if m else p.stem}"


def pair_groups(pairs_csv: Path, names: pd.Series) -> pd.Series:
    """The group of each of ``names`` from ``pairs_csv`` (``fake,real``): ``pair/<real>`` for a real and every fake
    made from it, the name itself for a file in no pair. A malformed file, a fake listed twice or a listed file
    that is not in the folder is refused naming the file."""
    where = str(pairs_csv)
    try:
        pairs = pd.read_csv(pairs_csv, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as e:
        raise InputError(f"{where}: not a readable CSV ({e})") from e
    if list(pairs.columns) != ["fake", "real"]:
        raise InputError(f"{where}: header is {','.join(map(str, pairs.columns))!r}; expected 'fake,real'")
    twice = pairs.fake[pairs.fake.duplicated()]
    if len(twice):
        raise InputError(f"{where}: fake {twice.iloc[0]!r} is listed twice (one row per fake)")
    missing = sorted(set(pairs.fake) - set(names) | set(pairs.real) - set(names))
    if missing:
        raise InputError(f"{where}: {len(missing)} listed file(s) not among the source's images, e.g. "
                         f"{missing[0]!r}")
    group = {**{r: f"pair/{r}" for r in pairs.real}, **dict(zip(pairs.fake, "pair/" + pairs.real))}
    return names.map(lambda n: group.get(n, n))


def source_groups(root: Path, items: pd.DataFrame) -> tuple[str, pd.Series]:
    """(the rule, the group of each of ``items``) for a folder source: ``pairs`` when it has a ``pairs.csv``,
    else ``identity`` (:data:`GROUPINGS`)."""
    if (root / PAIRS_FILE).is_file():
        return "pairs", pair_groups(root / PAIRS_FILE, items.img_name)
    return "identity", items.img_name.map(identity_group)


def split_groups(items: pd.DataFrame, groups: pd.Series, heldout: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Random (train, held-out) split of whole groups, stratified by label; deterministic for ``seed``.

    Strata: the groups of reals only, of fakes only, then the groups holding both (a fake and its real): each
    gives ``heldout`` of its groups. With no mixed group this is the split of one-class groups it always was."""
    rng = np.random.default_rng(seed)
    labels = pd.Series(items.label.to_numpy(), index=groups.to_numpy()).groupby(level=0).agg(["min", "max"])
    strata = [labels.index[(labels["min"] == v) & (labels["max"] == v)] for v in (0, 1)]
    strata.append(labels.index[labels["min"] != labels["max"]])
    held = np.zeros(len(items), bool)
    for uniq in strata:
        if len(uniq) == 0:
            continue  # no draw: an empty stratum leaves the generator where the two-class split left it
        pick = rng.permutation(np.array(sorted(uniq)))[: int(round(heldout * len(uniq)))]
        held |= groups.isin(set(pick)).to_numpy()
    return items[~held].reset_index(drop=True), items[held].reset_index(drop=True)


def groups_of(df: pd.DataFrame) -> pd.Series:
    """A part's ``group`` column (:func:`source_groups`), or each image alone in a frame without one."""
    return df.group if "group" in df else df.img_name


def cap_train(train: pd.DataFrame, cap: int, seed: int) -> pd.DataFrame:
    """At most ``cap`` images of a training part (0 = all): whole groups (``group`` column) drawn in a seeded order,
    each kept while neither class passes half the cap, so a large source joins a combined set class-balanced and at
    the size of the others. Rows keep their order."""
    if cap <= 0 or len(train) <= cap:
        return train
    groups = groups_of(train)
    counts = pd.crosstab(groups, train.label).reindex(columns=[0, 1], fill_value=0)
    order = np.random.default_rng(seed).permutation(np.array(sorted(counts.index)))
    quota, taken, keep = np.array([cap // 2, cap - cap // 2]), np.zeros(2, int), []
    for g in order:  # one step per group (a few thousand), not per pixel
        n = counts.loc[g].to_numpy()
        if (taken + n <= quota).all():
            taken += n
            keep.append(g)
        if (taken == quota).all():
            break
    return train[groups.isin(set(keep)).to_numpy()].reset_index(drop=True)


def load_source(root: Path, heldout: float = 0.3, seed: int = 0) -> Source:
    """A source in the competition layout (trainset/ + valset/ label CSVs) or as real/ + fake/ folders (grouped by
    :func:`source_groups`: a group is never on both sides of the train / held-out split)."""
    from dfpipe.data.labels import read_labels

    root = Path(root).resolve()
    if (root / "trainset_label.txt").is_file():
        tr = read_labels(root / "trainset_label.txt")[["img_name", "label"]]
        va = read_labels(root / "valset_label.txt")[["img_name", "label"]]
        tr["img_name"] = "trainset/" + tr.img_name
        va["img_name"] = "valset/" + va.img_name
        tr["group"], va["group"] = tr.img_name, va.img_name
        return Source(root.name, tr, va, va, root, "image")
    items = _folder_items(root)
    grouping, groups = source_groups(root, items)
    items["group"] = groups.to_numpy()
    train, held = split_groups(items, items.group, heldout, seed)
    return Source(root.name, train, held, items, root, grouping)
