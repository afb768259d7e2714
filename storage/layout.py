"""Where each object of a store lives and how each array is encoded (docs/format.md): the store's layout in one place.

    xwin.json                                        store index: format, catalog bucket width, datasets
    volumes/<volume_id>/hu                           canonical HU volume, int16 (X, Y, Z), chunks of HU_CHUNK_Z slices
    datasets/<cohort>/<spec_hash>/_spec.json         the RenderSpec the dataset is made with
    datasets/<cohort>/<spec_hash>/rings/<volume_id>/ views (V, H, W) + the META_ARRAYS of the ring
    <scope>/_commits, <scope>/_catalog, <scope>/_claims   control objects of each commit domain (scope.py)
    splits/<cohort>.json                             the cohort's subject-level split assignment (SplitsDoc)

Ids become path segments, so they are checked (:func:`check_id`) before any key is made from them.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
from zarr.codecs import BloscCodec, ZstdCodec

FORMAT_NAME = "xwin-store"
FORMAT_VERSION = 1
INDEX_KEY = "xwin.json"  # store index: format + list of datasets (control object, not zarr)
HU_CHUNK_Z = 16
META_ARRAYS = ("index", "yaw_deg", "cone_vec", "world_from_camera", "intrinsics")
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


def check_id(kind: str, value: str) -> str:
    """Ids become path segments: letters, digits, '.', '_', '-' only (no '/', no leading dot)."""
    if not isinstance(value, str) or not _ID_RE.match(value):
        raise ValueError(f"invalid {kind} {value!r}: use 1-200 chars of [A-Za-z0-9._-], not starting with . _ -")
    return value


VOLUMES = "volumes"  # the canonical volumes' scope: its control objects and one folder per volume


def split_dataset_url(text: str) -> tuple[str, str | None, str | None]:
    """A dataset as a person names it: ``<store url>[#<cohort>[/<spec hash or a unique prefix>]]`` -> (store url,
    cohort or None, spec hash or None). ``"/data/xwin#nlst/0f50"`` -> ("/data/xwin", "nlst", "0f50")."""
    url, sep, frag = text.partition("#")
    if not url:
        raise ValueError(f"dataset {text!r}: no store URL before '#' (use <store url>#<cohort>[/<spec hash>])")
    if not sep:
        return url, None, None
    cohort, _, spec_hash = frag.partition("/")
    if not cohort or "/" in spec_hash:
        raise ValueError(f"dataset {text!r}: use <store url>#<cohort>[/<spec hash>]")
    return url, cohort, spec_hash or None


def volume_path(volume_id: str) -> str:
    return f"{VOLUMES}/{check_id('volume_id', volume_id)}"


def dataset_path(cohort: str, spec_hash: str) -> str:
    return f"datasets/{check_id('cohort', cohort)}/{check_id('spec_hash', spec_hash)}"


def splits_key(cohort: str) -> str:
    """The split assignment of ``cohort`` (a control object, compare-and-swap updated)."""
    return f"splits/{check_id('cohort', cohort)}.json"


def spec_key(dataset: str) -> str:
    """The spec document of the dataset at path ``dataset``."""
    return f"{dataset}/_spec.json"


def rings_path(dataset: str) -> str:
    """The group holding every ring of the dataset at path ``dataset``."""
    return f"{dataset}/rings"


def ring_path(dataset: str, volume_id: str) -> str:
    return f"{rings_path(dataset)}/{check_id('volume_id', volume_id)}"


# ---- codecs -------------------------------------------------------------------------------------------------------
# Codec of projection chunks, chosen by bench/bench_store.py on the bundled CT ring (docs/benchmarks.md, Store):
# Blosc-LZ4 + byte shuffle writes and reads faster than zstd-3 / Blosc-zstd-3 at a compression ratio close to the
# best (float line integrals compress little whatever the codec). The others stay selectable (a ring records its
# codec in its zarr.json, so readers need no setting).
VIEW_CODECS: dict[str, Callable[[np.dtype], BloscCodec | ZstdCodec]] = {
    "blosc-lz4-shuffle": lambda dt: BloscCodec(cname="lz4", clevel=5, shuffle="shuffle", typesize=dt.itemsize),
    "blosc-zstd3-shuffle": lambda dt: BloscCodec(cname="zstd", clevel=3, shuffle="shuffle", typesize=dt.itemsize),
    "zstd3": lambda dt: ZstdCodec(level=3),
}
DEFAULT_VIEW_CODEC = "blosc-lz4-shuffle"


def make_views_codec(dtype: np.typing.DTypeLike, name: str = DEFAULT_VIEW_CODEC) -> BloscCodec | ZstdCodec:
    """The codec of projection chunks of ``dtype`` (one of :data:`VIEW_CODECS`)."""
    if name not in VIEW_CODECS:
        raise ValueError(f"unknown views codec {name!r}; known: {sorted(VIEW_CODECS)}")
    return VIEW_CODECS[name](np.dtype(dtype))


def hu_codec() -> BloscCodec:
    return BloscCodec(cname="zstd", clevel=3, shuffle="shuffle", typesize=2)


def meta_codec() -> ZstdCodec:
    return ZstdCodec(level=3)
