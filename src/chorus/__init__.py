"""chorus: distill one student language model from many teachers' cached sparse distributions.

The Python API for a training loop of one's own (docs/api.md): :class:`CacheDataset` (a store's rows with the
teachers' cached targets, in `chorus train`'s order), :func:`collate`, :class:`DistillLoss` (`chorus train`'s loss),
:class:`Store`; ``chorus.hf`` plugs them into Hugging Face ``Trainer`` and TRL. They are imported on first use, so
``import chorus`` (and ``chorus --help``) stays light.
"""

__version__ = "0.1.0"

from chorus.errors import ChorusError, IntegrityError

_LAZY = {"CacheDataset": "chorus.student.dataset", "collate": "chorus.student.dataset",
         "DistillLoss": "chorus.student.loss", "Store": "chorus.store", "load_student": "chorus.student.model"}

__all__ = ["CacheDataset", "ChorusError", "DistillLoss", "IntegrityError", "Store", "__version__", "collate",
           "load_student"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'chorus' has no attribute {name!r}")
