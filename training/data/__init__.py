"""The X-WIN training data: a resumable streaming dataset over projection stores and a real-CXR stream.

See docs/training-data.md for the sample format, the order and resume guarantees, and the loader setup.
"""

from .order import EpochOrder, shard_batches, unit_rng
from .real_cxr import BadImage, RealCXRStream, read_radiograph
from .readers import StoreSource, SyntheticSource, ViewReader, ViewSource
from .sampling import XWinSampling
from .stream import ResumableLoader, ResumableStream, XWinStream, make_loader

__all__ = [
    "BadImage",
    "RealCXRStream",
    "read_radiograph",
    "EpochOrder",
    "shard_batches",
    "unit_rng",
    "StoreSource",
    "SyntheticSource",
    "ViewReader",
    "ViewSource",
    "XWinSampling",
    "ResumableLoader",
    "ResumableStream",
    "XWinStream",
    "make_loader",
]
