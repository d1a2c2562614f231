"""The `vmwatch` command line: thin parsing over the library."""
