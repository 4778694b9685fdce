"""Running a teacher once: its sparse next-token targets (top-k normalized over the full vocabulary, unbiased
samples, exact tail statistics) per store row, and the map from a teacher's own tokenizer to the store's."""

from chorus.teacher.alignment import align, check_text
from chorus.teacher.cross import CrossMap, TokenText
from chorus.teacher.cross_targets import cross_targets
from chorus.teacher.model import Teacher, load_teacher, resolve_dtype
from chorus.teacher.writer import ShardWriter

__all__ = ["CrossMap", "ShardWriter", "Teacher", "TokenText", "align", "check_text", "cross_targets", "load_teacher",
           "resolve_dtype"]
