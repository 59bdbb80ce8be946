"""Stage 1: validate label CSVs and images, decode once, write the native-resolution image store and manifests."""

from dfpipe import harness

if __name__ == "__main__":
    harness.stage("prepare_data", __doc__)
