"""The contract between the service and its clients, and the one part of the daemon the CLI and
the store import: the socket protocol (typed requests and responses, version, limits), the
errors with their codes, the shared names (methods, concept names) and the settings that say
where everything lives. Nothing here imports the rest of the daemon, or torch."""
