"""`fleet watch`: continuous drift detection that tells the team (docs/watch.md).  `events` turns
observation cycles into events; `unit` writes the systemd units that run it."""
