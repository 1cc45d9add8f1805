"""Helpers the test modules share (imported as `helpers.<module>`; never collected as tests)."""
