"""``python -m dfpipe.demo ROOT``: write the demo dataset."""

import sys

from .dataset import main

sys.exit(main())
