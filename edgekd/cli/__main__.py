"""`python -m edgekd.cli` is `edgekd`."""

from edgekd.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
