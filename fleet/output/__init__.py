"""What leaves fleet for its readers, made from plain results: `text` (tables and sentences for
a terminal), `markdown` (the audit for a postmortem), `json` (every `--json` document and the one
function that writes them); for readers outside a terminal session `metrics` (node_exporter
textfile), `html` (the status page), the `redact`ion every such text goes through, and `files`
(atomic writes).  No I/O besides writing files."""
