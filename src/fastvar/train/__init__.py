"""fastvar.train."""
