"""fleet's benchmarks: collection against the OpenSSH floor, planning at scale, apply wall time.

Entry point: `python -m bench` (see `python -m bench --help` and docs/PERFORMANCE.md).
Nothing in here is imported by fleet or by its tests; timings are measured and reported, never
asserted.
"""
