"""Stage 2: image-editing forgeries, Stable Diffusion fakes (when a model is set), widened reals."""

from dfpipe import harness
from dfpipe.config import AugmentConfig, load_section


def main(args) -> None:
    from dfpipe.augment_sd import run

    run(load_section(AugmentConfig, "augment", args.params))


if __name__ == "__main__":
    harness.run(main, harness.parser(__doc__).parse_args())
