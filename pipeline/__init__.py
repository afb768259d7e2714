"""Pure pipeline code: ingest, geometry, rendering, reconstruction. Imports only ``xwin.schemas`` of the package,
never Prefect, never the store."""
