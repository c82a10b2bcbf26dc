"""The one exception type the command line turns into a one-line message and exit code 2."""


class UsageError(Exception):
    """Bad input from the user or the disk: a flag, a config file, a dataset or a weights file.

    The message is complete on its own (it names the flag or file and what is wrong with it); the
    command line prints it as a single line and exits with ``EXIT_USAGE``.
    """


EXIT_USAGE = 2
