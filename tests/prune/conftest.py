"""The trainer's synthetic teacher store, shared with the compression tests."""

from tests.trainer.conftest import _one_thread, teacher_store, vocab_size  # noqa: F401
