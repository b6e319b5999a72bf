"""fastvar.models."""
