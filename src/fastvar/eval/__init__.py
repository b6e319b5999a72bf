"""fastvar.eval."""
