"""Stage 5: ensemble the experts with TTA, write submissions/prediction.txt and the metrics."""

from dfpipe import harness
from dfpipe.config import PredictConfig, load_section


def main(args) -> None:
    from dfpipe.ensemble_predict import run

    run(load_section(PredictConfig, "predict", args.params))


if __name__ == "__main__":
    harness.run(main, harness.parser(__doc__).parse_args())
