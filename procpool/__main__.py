"""``python -m procpool``: the same command line as the ``procpool`` console script."""

from procpool.cli import main

if __name__ == "__main__":
    main()
