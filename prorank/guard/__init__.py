"""The services' guard: the gRPC server both services run on, its connection gate, its TLS and its log of refusals."""
