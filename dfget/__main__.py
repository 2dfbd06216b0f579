"""`python -m dfget ...` is the same as the `dfget` console script."""

from dfget.cli import main

if __name__ == "__main__":
    main()
