"""The cones service. Importing this package must stay cheap (no torch): the CLI imports
its protocol, settings and errors modules."""
