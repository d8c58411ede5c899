"""janus-decoding: a plugin registry of decoding strategies for Janus / Janus-Pro."""
