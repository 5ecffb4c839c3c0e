"""Peer serving systems we compare against, each set up in its own venv outside the project's (under
`.peers/`, ignored by git). One folder per peer; see README.md "Reproducing the comparisons"."""
