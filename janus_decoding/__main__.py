"""`python -m janus_decoding` is the `janus-decode` command."""

from janus_decoding.cli import main

if __name__ == "__main__":
    main()
