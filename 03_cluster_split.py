"""Stage 3: embed images, k-means them, and split train/val by whole clusters."""

from dfpipe import harness

if __name__ == "__main__":
    harness.stage("cluster_split", __doc__)
