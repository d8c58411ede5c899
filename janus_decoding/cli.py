import click


@click.group()
def main() -> None:
    """Decoding strategies for Janus / Janus-Pro."""
