"""Observing hosts: the collection command, the pure parsers of its output, and the collector
that runs it through a transport (`fleet.transport`)."""
