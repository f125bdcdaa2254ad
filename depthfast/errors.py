"""The one exception type the CLI turns into a one-line message instead of a traceback."""


class DepthfastError(Exception):
    """A problem with the user's input or environment, stated in words the user can act on."""
