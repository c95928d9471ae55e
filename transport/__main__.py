"""``python -m transport`` -> :func:`transport.cli.main`."""
import sys

from transport.cli import main

if __name__ == "__main__":
    sys.exit(main())
