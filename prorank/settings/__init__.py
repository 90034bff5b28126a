"""Configuration: the typed sections of a run and of the services, and the YAML files and overrides that fill them."""
