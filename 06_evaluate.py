"""Stage 6: score labelled sets no training step saw (and degraded copies); cross-dataset table."""

from dfpipe import harness
from dfpipe.config import EvaluateConfig, load_section


def main(args) -> None:
    from dfpipe.evaluate import run_evaluate

    run_evaluate(load_section(EvaluateConfig, "evaluate", args.params))


if __name__ == "__main__":
    harness.run(main, harness.parser(__doc__).parse_args())
