"""``python -m osteoscan`` runs the command-line interface."""

from osteoscan.cli import main

if __name__ == "__main__":
    main()
