"""``python -m relay_idem``: the ``relay-idem`` command."""

from relay_idem.cli import main

if __name__ == "__main__":
    main()
