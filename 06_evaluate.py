"""Stage 6: score labelled sets no training step saw (and degraded copies); cross-dataset table."""

from dfpipe import harness

if __name__ == "__main__":
    harness.stage("evaluate", __doc__)
