"""Stage 1: validate the input datasets, decode every image once, write a resized cache.

Inputs: by default the competition layout under ``data_root`` (``trainset/`` + ``trainset_label.txt``,
``valset/`` + ``valset_label.txt``, every image of ``testset/``); or ``datasets``, a list of
{name, split, images, labels} combining several sources (see :func:`resolve_sources`).

Output (``out_dir``):
  manifest.csv  uid,img_name,split,label,path,cache_file,cache_index,orig_w,orig_h,error,
                phash,dhash,dup_group,face,face_x,face_y,face_w,face_h,dataset,converted
                (label -1 for test; ``path`` is the source file; one row per listed image that
                exists: an image that failed to decode keeps its row, with cache_index -1 and
                the reason in ``error``, so the submission can still give it a row).
                ``phash``/``dhash``: 64-bit perceptual hashes (hex) of the decoded image;
                ``dup_group``: connected component of the near-duplicate graph (-1 for failed
                images; a singleton has its own id), so a split can keep duplicates in one fold;
                ``face``: off / found / largest_of_N / none (no face, kept whole) / skipped, and the
                detector's box (x, y, w, h in original pixels, -1 when none); ``dataset``: the input
                it came from; ``converted``: ``;``-joined conversions applied (exif_rotated, cmyk, ...).
  {split}.npy   uint8 (N, S, S, 3) RGB, one row per manifest row of the split, in manifest order, at
                ``cache_index``; S = cache_size. The row of a failed image stays zero (its
                cache_index is -1), so no row ever moves and no cache is copied to compact it.
                Images are resized to S x S (aspect ratio not kept: faces crops are near square and
                the detectors see the same geometry at train and test time).
The report (``report``) lists every skipped file with its reason code (``kind``) and message, counts
per reason, conversions per kind, files that no label lists, per-dataset counts and the near-duplicate
counts per split pair (``duplicates``); the pairs themselves go to ``cfg.duplicates``
(see :mod:`dfpipe.data.dedup`).

Scale and resume: images are decoded by a process pool in tasks of ``TASK_SIZE``, with a bounded number
of tasks in flight, and their pixels written straight to the cache files with ``os.pwrite`` (no memory
map, whose touched pages would count in RSS). Every ``chunk_size`` images of a split form a chunk whose
manifest rows are committed atomically to ``<out_dir>.work/chunks/``; ``journal.json`` there holds a
fingerprint of the settings and of every input file (path, size, mtime). A killed run, rerun with the
same fingerprint, decodes only the chunks not committed and ends with the same bytes; any other
fingerprint starts afresh. The work dir lives beside ``out_dir`` (dvc deletes declared outs before a
run) and is renamed into place at the end, so the caches are never copied.

Modules, by job: :mod:`.sources` (datasets -> items), :mod:`.work` (the resumable work dir and its
journal), :mod:`.pool` (decoding in worker processes, chunk commits), :mod:`.publish` (manifest, dedup,
report, the rename into place), :mod:`.pipeline` (:func:`run`).
"""

from .pipeline import prepare, run
from .pool import TASK_SIZE, Loaded, Task
from .publish import Tally
from .sources import SPLITS, Collected, Item, Source, collect_items, resolve_sources
from .work import CHUNK_COLUMNS, MANIFEST_COLUMNS, WORK_KEYS, WORK_VERSION, Work, fingerprint

__all__ = ["CHUNK_COLUMNS", "MANIFEST_COLUMNS", "SPLITS", "TASK_SIZE", "WORK_KEYS", "WORK_VERSION", "Collected",
           "Item", "Loaded", "Source", "Tally", "Task", "Work", "collect_items", "fingerprint", "prepare",
           "resolve_sources", "run"]
