"""Stage 1: validate the input datasets, decode every image once, keep it at native resolution in the store.

Inputs: by default the competition layout under ``data_root`` (``trainset/`` + ``trainset_label.txt``,
``valset/`` + ``valset_label.txt``, every image of ``testset/``); or ``datasets``, a list of
{name, split, images, labels} combining several sources (see :func:`resolve_sources`).

Output (``layout.prepared``):
  manifest.csv  uid,img_name,split,label,path,cache_file,cache_index,orig_w,orig_h,width,height,error,
                phash,dhash,dup_group,face,face_x,face_y,face_w,face_h,dataset,converted
                (label -1 for test; ``path`` is the source file; one row per listed image that
                exists: an image that failed to decode keeps its row, with cache_index -1 and
                the reason in ``error``, so the submission can still give it a row).
                ``phash``/``dhash``: 64-bit perceptual hashes (hex) of the decoded image;
                ``dup_group``: connected component of the near-duplicate graph (-1 for failed
                images; a singleton has its own id), so a split can keep duplicates in one fold;
                ``face``: off / found / largest_of_N / none (no face, kept whole) / skipped, and the
                detector's box (x, y, w, h in pixels of the decoded, ``max_side``-downscaled image,
                -1 when none); ``width``/``height``: the stored (stage-1) image's size; ``dataset``: the
                input it came from; ``converted``: ``;``-joined conversions applied (exif_rotated, ...).
  {split}-NNNNNN.bin + .idx.npy
                the image store (:mod:`dfpipe.data.store`), one shard per chunk: each image's
                stage-1 version (:mod:`dfpipe.data.preprocess`) at native resolution, as the file's own
                bytes when nothing changed it, else lossless PNG; ``cache_file`` names the shard and
                ``cache_index`` the position (-1: failed, its position holds no bytes).
  store.json    the stage-1 settings every checkpoint records (max_side, face crop, margin, policy, the size
                rule: max_pixels, min_side).
  data_card.json
                what the store holds, for the ensemble card (:mod:`dfpipe.data.datacard`): labelled images per
                split and class, the data folder, and ``demo`` (a ``dataset_card.json`` of the inputs says so, as
                ``python -m dfpipe.demo`` writes); also the report's ``data``.
The report (``layout.prepare_report``) lists every skipped file with its reason code (``kind``) and message, counts
per reason, conversions per kind, files that no label lists, per-dataset counts and the near-duplicate
counts per split pair (``duplicates``); the pairs themselves go to ``layout.duplicates``
(see :mod:`dfpipe.data.dedup`).

Scale and resume: images are decoded by a process pool in tasks of ``TASK_SIZE``, with a bounded number
of tasks in flight, and their stored bytes appended to the chunk's shard by the parent. Every
``chunk_size`` images of a split form a chunk whose shard is renamed into place and whose manifest rows
are then committed atomically to ``<prepared>.work/chunks/``; ``journal.json`` there holds a
fingerprint of the settings and of every input file (path, size, mtime). A killed run, rerun with the
same fingerprint, decodes only the chunks not committed and ends with the same bytes; any other
fingerprint starts afresh. The work dir lives beside ``prepared`` (dvc deletes declared outs before a
run) and is renamed into place at the end, so the store is never copied.

Modules, by job: :mod:`.sources` (datasets -> items), :mod:`.work` (the resumable work dir and its
journal), :mod:`.pool` (decoding in worker processes, chunk commits), :mod:`.publish` (manifest, dedup,
report, the rename into place), :mod:`.pipeline` (:func:`run`).
"""

from .pipeline import run
from .pool import TASK_SIZE, Loaded, Task
from .publish import Tally
from .sources import SPLITS, Collected, Item, InputSet, collect_items, resolve_sources
from .work import CHUNK_COLUMNS, MANIFEST_COLUMNS, WORK_KEYS, WORK_VERSION, Work, fingerprint

__all__ = ["CHUNK_COLUMNS", "MANIFEST_COLUMNS", "SPLITS", "TASK_SIZE", "WORK_KEYS", "WORK_VERSION", "Collected",
           "InputSet", "Item", "Loaded", "Tally", "Task", "Work", "collect_items", "fingerprint",
           "resolve_sources", "run"]
