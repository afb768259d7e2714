"""One ring provenance, whichever path rendered the ring: the backfill's task and ``xwin render``
(``xwin.flows.render.render_volume_to_store``) both build it with ``xwin.flows.render.ring_provenance``."""

from __future__ import annotations

import pytest

from xwin.schemas.render import RenderSpec

SPEC = RenderSpec(height=32, width=32, pixel_mm=12.0, n_views=4, yaw_step_deg=90.0)


@pytest.fixture(scope="module")
def backfilled(tmp_path_factory, small_ct_path):
    from xwin.flows import backfill as bf
    from xwin.flows.params import BackfillParams

    store = tmp_path_factory.mktemp("prov") / "store"
    s = bf.run_local(
        BackfillParams(
            cohort="test",
            store=str(store),
            source=[str(small_ct_path)],
            spec=SPEC,
            backend="joseph",
            verify="none",
            previews=0,
        )
    )
    (entry,) = s.done
    return store, entry.volume_id


def test_backfill_and_render_command_write_the_same_provenance(backfilled):
    from xwin.flows.render import render_volume_to_store
    from xwin.storage import open_store

    store_url, vid = backfilled
    st = open_store(str(store_url))
    flow = st.dataset("test", SPEC).provenance(vid)
    # the same volume rendered again by the `xwin render` path, into another cohort's dataset of the same spec
    assert render_volume_to_store(st, vid, SPEC, cohort="again", backend="joseph") == "written"
    cmd = st.dataset("again", SPEC).provenance(vid)
    assert set(flow) == set(cmd)
    for key in ("canonical_volume_id", "backend", "backend_versions", "spec_hash", "spec", "units", "mu_water_per_mm"):
        assert flow[key] == cmd[key], key
    rec = st.volume_record(vid)
    assert flow["source"] == cmd["source"] == rec.source
    assert flow["series_uid"] == cmd["series_uid"] == rec.series_uid
    assert flow["backend"] == "joseph" and flow["spec_hash"] == SPEC.spec_hash
    assert flow["render_seconds"] > 0 and cmd["render_seconds"] > 0
    assert flow["units"] == "line integral of mu [1/mm] * mm"
    assert RenderSpec.model_validate(cmd["spec"]) == SPEC
    assert render_volume_to_store(st, vid, SPEC, cohort="again", backend="joseph") == "skipped"
