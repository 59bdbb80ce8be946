"""Stage 2: image-editing forgeries, Stable Diffusion fakes (when a model is set), widened reals."""

from dfpipe import harness

if __name__ == "__main__":
    harness.stage("augment_sd", __doc__)
