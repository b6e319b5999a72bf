"""fastvar.pipelines."""
