"""Running untrusted work in confined, forked child processes."""
