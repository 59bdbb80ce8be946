"""The development benchmark: leave-one-source-out over ``../shared/data``, every recipe against the
seed-style baseline, with the same data, folds, epochs and seeds.

For each training set, each recipe and each seed, one *cell* runs the pipeline's own stages in-process, in a work
folder of its own (``<work>/<training set>/...``). A training set is one source (the default: each of ``sources``
alone, folder ``<work>/<source>/``) or several trained on at once (``train_on: [a+b, ...]``, folder
``<work>/a+b/``; same cell keys, so the two kinds share a work folder without touching each other):

1. stage 1 on the training part of each source of the set only (the held-out parts are never prepared); a
   combined set reads one dataset per source (stage 1 names its images ``<source>/<img_name>``);
2. stage 2 (editing fakes) and stage 3 (cluster split) once per training set, shared by every recipe, so
   all rows train on the same folds; recipes with ``use_augmented: false`` ignore the generated images;
3. stage 4 (one expert: the recipe), stage 5 (val fold: epoch selection and verdict thresholds);
4. stage 6 on the sets no step above saw: the held-out part of each source trained on (the *in-source* columns)
   and the other sources (the *leave-one-source-out* columns).

The selection fold (stage 3's val fold) is never a reported column: every number in the table comes
from stage 6. Held-out parts: ``yonsei_faces`` keeps its own ``valset``; the two folder sources are
split 70/30 with a fixed seed, by group (:data:`GROUPINGS`: ``genphotos_frll`` by identity, ``NNN_03`` and
``NNN_08`` are one person; ``dfdc_faces`` by pair, a fake and its real from ``pairs.csv``).
Cross-source columns use ``yonsei_faces/valset`` and the whole of the other sources. ``max_train_per_source``
caps each source's training part (seeded, class-balanced, whole groups) so one large source does not dominate a
combined set; ``leave_one_out: true`` (``bench/grid_loso.yaml``) makes the table's summary one column per
held-out source.

Ensemble rows (``ensembles:`` of the grid): the finished cells of two or more recipes, same training source and
seed, combined by stage 5 and scored by stage 6 like any cell, without training (:func:`run_ensemble`).

Results: ``<out>/grid.json`` (every cell's stage-6 metrics), ``<out>/table.md`` (AUC per seed and their
mean, TPR at FPR 1e-2, mean of the leave-one-source-out columns, the difference to the baseline with a
paired bootstrap interval over the images). With combined training sets the table adds a summary of them: their
cross-source AUC "together" beside the same recipe's single-source cells of the same sources "alone" (read from
the work folder, e.g. left there by ``bench/grid.yaml``; never trained by such a grid).
"""

from .grid import (GROUPINGS, GridSpec, JOIN, PAIRS_FILE, RobustnessSpec, Source, TrainingSet, cap_train,
                   ensemble_cells, grid_cells, grid_recipes, groups_of, held_out_source, identity_group, is_combined,
                   load_grid, load_source, load_sources, pair_groups, recipe_config, set_parts, source_groups,
                   split_groups, train_parts, training_set, training_sets)
from .cells import (CELL_STAGES, GROUPS_RECORD, KEY_OMIT_AT, SHARED_RECORD, SOURCE_STAGES, cell_dir, cell_key,
                    cell_layout, code_version, eval_sets, finished_cell, groups_across_folds, omit_later,
                    prepare_source, process_code_version, read_json, run_cell, section, select_and_evaluate,
                    shared_settings, source_layout, stage_config)
from .runs import (ENSEMBLE_FORMAT, ROBUSTNESS_FORMAT, ensemble_dir, run_ensemble, run_grid, run_robustness,
                   single_source_reference)
from .tables import (cell_metrics, grid_table, held_out_means, loso_summary, paired_auc_diff, paired_seed_deltas,
                     write_grid)
from .queue import (ACTIVE, CellParams, EXP_JOIN, PROJECT, STAGE_OUTPUTS, dvc, exp_name, queue_grid, queue_status,
                    run_cell_stage, run_past_daemons, wait_for_queue)
