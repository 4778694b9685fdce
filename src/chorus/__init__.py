"""chorus: distill one student language model from many teachers' cached sparse distributions."""

__version__ = "0.1.0"

from chorus.errors import ChorusError, IntegrityError

__all__ = ["ChorusError", "IntegrityError", "__version__"]
