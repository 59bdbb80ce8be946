"""Stage 3: embed images, k-means them, and split train/val by whole clusters."""

from dfpipe import harness
from dfpipe.config import SplitConfig, load_section


def main(args) -> None:
    from dfpipe.cluster_split import run

    run(load_section(SplitConfig, "split", args.params))


if __name__ == "__main__":
    harness.run(main, harness.parser(__doc__).parse_args())
