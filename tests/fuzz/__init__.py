"""Property-based fuzzing: the reference parser in process, the socket API of a real daemon."""
