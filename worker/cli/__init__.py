"""The `videoqa` command line: local stack, demo, GPU supervisor, ask and model checks."""
