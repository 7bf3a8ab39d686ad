"""``python -m scripts.predict`` is ``python -m pipeline.predict`` (and the ``fashion-predict`` command)."""

import sys

from pipeline.predict import main

if __name__ == "__main__":
    sys.exit(main())
