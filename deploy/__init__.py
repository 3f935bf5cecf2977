"""Deployment artefacts rendered from the repository's sources (``deploy/kubernetes/``)."""
