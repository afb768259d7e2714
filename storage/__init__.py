"""The only code that knows the on-disk / object-store layout (docs/format.md)."""
