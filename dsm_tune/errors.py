"""The one base class for errors that are the user's to fix (bad input, missing files, unfit configs).

The CLI prints these as a single line; anything else is a bug and keeps its traceback.
"""


class DSMTuneError(Exception):
    """A problem with the user's input or environment, described in one line."""
