"""The .proto files (the one definition of every message on the wire) and their generated stubs."""
