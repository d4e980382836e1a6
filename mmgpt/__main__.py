"""``python -m mmgpt`` runs the ``mmgpt`` command line."""

import sys

from mmgpt.cli import main

if __name__ == "__main__":
    sys.exit(main())
