"""fastvar.accel."""
