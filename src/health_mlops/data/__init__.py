"""Data: reading hospital files, validating them against a spec, splitting, preprocessing, generating."""
