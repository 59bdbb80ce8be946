"""Stage 4: train one expert (loop, EMA teacher, AMP, checkpoints)."""
