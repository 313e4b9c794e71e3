"""Shared file infrastructure for sessions and pipelines.

files (atomic writes, disk-full watch), held (writes held back and retried while the disk
is full), journal (a session's append-only record, to resume it) and offload (blocking
file work off the event loop).
"""
