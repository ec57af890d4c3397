"""The command-line jobs: each runs as `python jobs/<name>.py`, as its cmd-* script (pyproject.toml)
or under `ray job submit`."""
