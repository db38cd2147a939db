"""Suite-wide settings that must be in place before any test module imports its SDK."""

import os

# gRPC's C core logs connection events (GOAWAY on server stop) to stderr at INFO.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
