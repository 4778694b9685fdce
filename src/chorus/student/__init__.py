"""The student side: the model wrapper and its fused loss, the public dataset and loss for any training loop, the deterministic resumable stream of cached rows,
evaluation on held-out rows, and the training loop `chorus train` and `chorus compress` run."""

from chorus.student.data import CachedRows, Positions, StreamLoader, positions
from chorus.student.dataset import CacheDataset, collate
from chorus.student.evaluate import evaluate_model, evaluate_teacher_cache
from chorus.student.loss import DistillLoss
from chorus.student.model import Student, load_student
from chorus.student.training import train

__all__ = ["CacheDataset", "CachedRows", "DistillLoss", "collate", "Positions", "StreamLoader", "Student", "evaluate_model", "evaluate_teacher_cache",
           "load_student", "positions", "train"]
