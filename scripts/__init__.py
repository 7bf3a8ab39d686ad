import pipeline  # noqa: F401  (its import sets up the one-line Ctrl-C while a script's own imports run)
