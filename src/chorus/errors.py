"""The one exception users see: its message is a single actionable line."""


class ChorusError(Exception):
    """A user-facing error. The CLI prints ``str(err)`` (no traceback) and exits 2."""


class IntegrityError(ChorusError):
    """Stored bytes do not match their commit record (corruption, or a partial write)."""


class StillCreating(ChorusError):
    """A unit exists but its writer has not yet written its manifest (it is being created, or was killed)."""
