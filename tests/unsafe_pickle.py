"""A stand-in for a checkpoint that runs code when it is unpickled, for the loaders' refusal tests."""

from pathlib import Path


class CreatesMarkerFile:
    """Unpickling this object calls Path.touch(marker): stand-in for a checkpoint that runs code when loaded."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)
