"""The one exception type for user errors: the CLI prints its message on one line and exits 2."""


class GvaeError(Exception):
    """Bad input from the user (config, study file, dataset, paths); the message names the fix."""
