"""Stage 1: validate label CSVs and images, decode once, write the native-resolution image store and manifests."""

from dfpipe import harness
from dfpipe.config import PrepareConfig, load_section


def main(args) -> None:
    from dfpipe.prepare_data import run

    run(load_section(PrepareConfig, "prepare", args.params))


if __name__ == "__main__":
    harness.run(main, harness.parser(__doc__).parse_args())
