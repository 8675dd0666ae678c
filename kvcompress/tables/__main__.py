"""``python -m kvcompress.tables [TABLE] [key=value ...]`` (see :mod:`kvcompress.tables`)."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
