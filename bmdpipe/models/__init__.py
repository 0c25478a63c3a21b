"""Models without I/O: small torch modules that compose (generator = encoder + decoder)."""
