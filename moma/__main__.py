"""``python -m moma``: the ``moma`` command."""

from moma.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
