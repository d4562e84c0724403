"""The domain exceptions of osteoscan and the exit codes they map to.

The CLI turns these into exit codes in exactly one place (``osteoscan.cli.main``): 0 success,
1 the run itself failed, 2 usage error. Bad input *files* never raise: they become rows with
``status=error``.
"""

from __future__ import annotations


class OsteoscanError(Exception):
    """A failure of the run itself (no model, unwritable output, lock held...): exit code 1."""

    exit_code: int = 1


class UsageError(OsteoscanError):
    """The command was called wrongly (bad option value, missing input): exit code 2."""

    exit_code = 2


class ModelIntegrityError(OsteoscanError):
    """A model package is malformed or its weights do not match the sha256 in its manifest."""


class PretrainedUnavailableError(OsteoscanError):
    """ImageNet weights were asked for but cannot be found offline.

    The message says which file to put where.
    """


class LockHeldError(OsteoscanError):
    """Another osteoscan process holds the lock on the same state/outputs."""


class OutputError(OsteoscanError):
    """Writing an output failed (disk full, permission denied); earlier results stay intact."""
