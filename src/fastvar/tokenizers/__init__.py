"""fastvar.tokenizers."""
