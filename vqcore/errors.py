"""Errors vqcore raises for bad user input: each message names the file, input or tensor shape at fault."""


class VQCoreError(ValueError):
    """Bad input: a file, an argument or a tensor that vqcore cannot use."""


class CheckpointError(VQCoreError):
    """A checkpoint file or folder that cannot be read or does not hold the expected model."""


class NonFiniteResult(VQCoreError):
    """A model computed NaN or infinite values from finite input: damaged weights, or overflow of its dtype."""


class Cancelled(Exception):
    """A long loop (tiled pass, sampling) stopped because its should_cancel() hook answered True."""
