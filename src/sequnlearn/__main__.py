"""`python -m sequnlearn` (so that `accelerate launch -m sequnlearn unlearn ...` works)."""

from sequnlearn.cli import main

if __name__ == "__main__":
    main()
