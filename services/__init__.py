"""Processes around the engine: the gRPC gateway, `twolane serve` and the CLI."""
