"""What the stream reads from: a small reader interface, a synthetic in-memory source and the real store.

A *source* is a small picklable description (URL, cohort, spec) whose ``open()`` returns a *reader*. Sources cross
process boundaries (DataLoader workers are spawned); readers never do: each worker opens its own, because fsspec,
obstore and zarr's event loop are not fork-safe.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Protocol, runtime_checkable

import numpy as np

from xwin.schemas.render import RenderSpec


@runtime_checkable
class ViewReader(Protocol):
    """The subset of ``xwin.storage.ProjectionDataset`` the consumer uses."""

    spec: RenderSpec

    def volume_ids(self) -> list[str]: ...

    def read_views(self, volume_id: str, indices) -> tuple[np.ndarray, Any]:
        """(n,) view indices -> ((n,H,W) float32, meta with ``yaw_deg`` (n,) and ``index`` (n,))."""
        ...


class ViewSource(Protocol):
    def open(self) -> ViewReader: ...


# --------------------------------------------------------------------------------------------------- synthetic
def synthetic_view_value(volume_number: int, index: int) -> float:
    """The constant offset of view ``index`` of synthetic volume ``volume_number`` (tests decode reads with it)."""
    return float(volume_number * 1000 + index)


@dataclass
class SyntheticReader:
    """Deterministic in-memory ring: view ``k`` of volume ``vNNNN`` is ``1000*NNNN + k`` plus a small ramp.

    The ramp (0..1 across columns) keeps per-image min-max well defined; ``views[..., 0, 0]`` decodes the view.
    """

    spec: RenderSpec
    n_volumes: int
    reads: int = 0

    def volume_ids(self) -> list[str]:
        return [f"v{i:04d}" for i in range(self.n_volumes)]

    def read_views(self, volume_id: str, indices) -> tuple[np.ndarray, SimpleNamespace]:
        n = int(volume_id[1:])
        if not 0 <= n < self.n_volumes:
            raise KeyError(f"no volume {volume_id!r}")
        idx = np.asarray(indices, dtype=np.int64)
        if np.any((idx < 0) | (idx >= self.spec.n_views)):
            raise IndexError(f"view index out of range 0..{self.spec.n_views - 1}: {idx}")
        ramp = np.linspace(0.0, 1.0, self.spec.width, dtype=np.float32)[None, None, :]
        base = np.asarray([synthetic_view_value(n, int(k)) for k in idx], np.float32)[:, None, None]
        views = np.broadcast_to(base + ramp, (len(idx), self.spec.height, self.spec.width)).astype(np.float32)
        yaws = np.asarray(self.spec.yaws_deg, dtype=np.float64)[idx]
        self.reads += 1
        return views, SimpleNamespace(yaw_deg=yaws, index=idx)


@dataclass(frozen=True)
class SyntheticSource:
    n_volumes: int
    spec: RenderSpec = field(default_factory=lambda: RenderSpec(height=16, width=16))

    def open(self) -> SyntheticReader:
        return SyntheticReader(self.spec, self.n_volumes)


# --------------------------------------------------------------------------------------------------- the store
@dataclass(frozen=True)
class StoreSource:
    """A projection dataset in an xwin store, opened read-only inside each process.

    ``spec``: a RenderSpec, a spec hash (str), or ``None`` when the store holds exactly one dataset for ``cohort``.
    ``storage_options`` is passed to ``open_store`` (S3 endpoint, credentials) and travels to the workers.
    A *dataset URL* names all three: ``<store url>#<cohort>[/<spec hash>]`` (``StoreSource.parse``).
    ``split``: only the volumes of that subject-level split (``xwin splits assign``; docs/training-data.md): the
    reader's catalog and volume ids hold nothing else, so no stream built on it can mix splits.
    """

    url: str
    cohort: str
    spec: RenderSpec | str | None = None
    storage_options: dict | None = None
    split: str | None = None

    @staticmethod
    def parse(dataset_url: str, storage_options: dict | None = None) -> StoreSource:
        """``"s3://bucket/prefix#nlst/0123abcd"`` or ``"/data/xwin#nlst"`` -> StoreSource."""
        from xwin.storage.layout import split_dataset_url

        url, cohort, spec_hash = split_dataset_url(dataset_url)
        if cohort is None:
            raise ValueError(f"dataset URL {dataset_url!r} must be '<store url>#<cohort>[/<spec hash>]'")
        return StoreSource(url, cohort, spec_hash, storage_options)

    @property
    def dataset_url(self) -> str:
        h = self.spec.spec_hash if isinstance(self.spec, RenderSpec) else self.spec
        return f"{self.url}#{self.cohort}" + (f"/{h}" if h else "")

    def open(self) -> ViewReader:
        from xwin.storage import open_store

        store = open_store(self.url, storage_options=self.storage_options, create=False)
        if isinstance(self.spec, RenderSpec):
            ds = store.dataset(self.cohort, self.spec, create=False)
        elif self.spec is None:  # the cohort's only dataset (DatasetLookupError, a ValueError, names them if several)
            ds = store.find_dataset(self.cohort)
        else:
            ds = store.open_dataset(self.cohort, self.spec)
        if self.split is None:
            return ds
        doc = store.read_splits(self.cohort)
        if doc is None:
            raise ValueError(
                f"split {self.split!r} asked, but cohort {self.cohort!r} has no split assignment in "
                f"{store.url}: run `xwin splits assign --store {store.url} --cohort {self.cohort}`"
            )
        known = set(doc.policy.fractions) | {"excluded"}
        if self.split not in known:
            raise ValueError(f"cohort {self.cohort!r} has no split {self.split!r}; its splits: {sorted(known)}")
        return SplitReader(ds, frozenset(doc.volumes_in(self.split)))


class SplitReader:
    """A projection dataset seen through one split: its catalog and volume ids hold only the split's volumes;
    reading a volume of another split is refused (KeyError, as for a volume that is not committed)."""

    def __init__(self, ds: Any, volumes: frozenset[str]) -> None:
        self._ds, self._volumes = ds, volumes
        self.spec = ds.spec

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ds, name)

    def catalog(self) -> list:
        return [r for r in self._ds.catalog() if r.volume_id in self._volumes]

    def volume_ids(self) -> list[str]:
        return [v for v in self._ds.volume_ids() if v in self._volumes]

    def read_views(self, volume_id: str, indices: Any, dtype: Any = np.float32) -> Any:
        # the same parameters as ProjectionDataset.read_views (the stream asks for the stored dtype by name)
        if volume_id not in self._volumes:
            raise KeyError(f"volume {volume_id!r} is not in this split")
        return self._ds.read_views(volume_id, indices, dtype=dtype)

    def read_labels(self, volume_id: str, *a: Any, **kw: Any) -> Any:
        if volume_id not in self._volumes:
            raise KeyError(f"volume {volume_id!r} is not in this split")
        return self._ds.read_labels(volume_id, *a, **kw)

    def read_materials(self, volume_id: str, *a: Any, **kw: Any) -> Any:
        if volume_id not in self._volumes:
            raise KeyError(f"volume {volume_id!r} is not in this split")
        return self._ds.read_materials(volume_id, *a, **kw)
