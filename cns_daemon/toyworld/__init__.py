"""The toy world (work in progress; API documented here once complete)."""
