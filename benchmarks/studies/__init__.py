"""Finished studies: each answered one question about a default; see README.md beside this file."""
