"""Stage 5: ensemble the experts with TTA, write submissions/prediction.txt and the metrics."""

from dfpipe import harness

if __name__ == "__main__":
    harness.stage("ensemble_predict", __doc__)
