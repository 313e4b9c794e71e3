"""Pipelines: what the gateway does with a session's audio (record, transcribe, ...)."""
