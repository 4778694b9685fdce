"""Reading documents from any `datasets` source and packing their tokens into fixed-length rows."""

from chorus.corpus.packing import Packer
from chorus.corpus.sources import iter_documents

__all__ = ["Packer", "iter_documents"]
