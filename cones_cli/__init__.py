"""The `cones` command: a thin client of the service's socket API (never imports torch)."""
