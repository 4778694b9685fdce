"""Corpus preparation and teacher caching: everything that writes a store."""
