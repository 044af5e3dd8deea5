"""What fleet writes for readers outside a terminal session: metrics files, status pages, and the
redaction every such text goes through.  Plain data in, text (and atomic file writes) out."""
