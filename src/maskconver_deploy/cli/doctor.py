"""PLACEHOLDER"""


def doctor() -> None:
    """Not built yet."""
