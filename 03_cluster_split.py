"""Stage 3: embed images, k-means them, and split train/val by whole clusters."""

from dfpipe import stage
from dfpipe.config import SplitConfig, load_section


def main(args) -> None:
    from dfpipe.split.stage import run_split

    run_split(load_section(SplitConfig, "split", args.params))


if __name__ == "__main__":
    stage.run(main, stage.parser(__doc__).parse_args())
