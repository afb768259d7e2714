"""The X-WIN training data: a resumable streaming dataset over projection stores and a real-CXR stream.

See docs/training-data.md for the sample format, the order and resume guarantees, and the loader setup.
"""

from .loader import ResumableLoader, make_loader
from .order import EpochOrder, shard_batches, unit_rng
from .readers import StoreSource, SyntheticSource, ViewReader, ViewSource
from .real_cxr import BadImage, RealCXRStream, read_radiograph
from .sampling import XWinSampling
from .stream import ResumableStream
from .xwin_stream import XWinStream

__all__ = [
    "BadImage",
    "EpochOrder",
    "RealCXRStream",
    "ResumableLoader",
    "ResumableStream",
    "StoreSource",
    "SyntheticSource",
    "ViewReader",
    "ViewSource",
    "XWinSampling",
    "XWinStream",
    "make_loader",
    "read_radiograph",
    "shard_batches",
    "unit_rng",
]
