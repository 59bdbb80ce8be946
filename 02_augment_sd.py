"""Stage 2: image-editing forgeries, Stable Diffusion fakes (when a model is set), widened reals."""

from dfpipe import stage
from dfpipe.config import AugmentConfig, load_section


def main(args) -> None:
    from dfpipe.augment.stage import run_augment

    run_augment(load_section(AugmentConfig, "augment", args.params))


if __name__ == "__main__":
    stage.run(main, stage.parser(__doc__).parse_args())
