"""strategies room of janus_decoding (see ../shared/architecture.md)."""
