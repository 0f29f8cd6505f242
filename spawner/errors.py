"""The spawner's failures, by whom they are meant for."""

from __future__ import annotations


class ClusterUnreachable(RuntimeError):
    """The login node could not be reached or did not answer (not: the job is gone)."""


class SpawnError(RuntimeError):
    """A failure with a message meant for the user on the spawn page."""


class CredentialExpired(SpawnError):
    """The user's certificate has expired (a new login renews it)."""


class StartTimeout(SpawnError):
    """The job ran, but its server did not answer within ``http_timeout``."""
