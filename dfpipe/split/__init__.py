"""Stage 3: embeddings, k-means, cluster-held-out folds."""
