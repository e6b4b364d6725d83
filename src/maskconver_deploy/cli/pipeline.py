"""PLACEHOLDER: replaced by the module's owner (the whole file)."""

from maskconver_deploy.errors import UserError


def pipeline() -> None:
    """Not built yet."""
    raise UserError("this command is not built yet")
