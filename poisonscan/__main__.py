"""``python -m poisonscan`` (also what ``torchrun -m poisonscan`` runs)."""

from poisonscan.cli import main

if __name__ == "__main__":
    main()
