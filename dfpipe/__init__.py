"""dfpipe: a reproducible image deepfake detection pipeline (multi-FFDI winning recipe)."""

import os

__version__ = "0.1.0"

# Nothing may wait on the network: set here, once, so any entry point (stage script, CLI, server, benchmark,
# test) has them before timm / huggingface_hub / albumentations / dvc are imported. A user's own value wins.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1",
               "DVC_NO_ANALYTICS": "1"}
for _name, _value in OFFLINE_ENV.items():
    os.environ.setdefault(_name, _value)
