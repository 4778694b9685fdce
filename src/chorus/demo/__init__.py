"""`chorus demo`: the whole pipeline end to end on text shipped with Python (an example of the commands wired
together: it calls only ``chorus.commands``)."""

from chorus.demo.pipeline import COMPRESSED, FULL, QUICK, TRAIN_EVAL_ROWS, Scale, run
from chorus.demo.report import claim, format_table, plot

__all__ = ["COMPRESSED", "FULL", "QUICK", "TRAIN_EVAL_ROWS", "Scale", "claim", "format_table", "plot", "run"]
