"""Pure pipeline code: ingest, geometry, rendering, reconstruction. Never imports Prefect or storage layout."""
