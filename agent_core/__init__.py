"""The daemon, the CLI and the parts that run tasks."""
