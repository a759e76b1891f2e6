"""Small helpers shared by the command lines in ``tools/`` (the library functions never need them)."""
