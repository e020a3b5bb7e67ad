"""``python -m vitscope`` (and ``torchrun -m vitscope analyze ...``) runs the command line."""

from vitscope.cli import main

if __name__ == "__main__":
    main()
