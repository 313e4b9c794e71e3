"""Audio in: what the bot sends and how it reaches the pipelines.

protocol (decoding the bot's frames, sans I/O), clock (stream time), speakers (who spoke
when, from rosters) and runner (feeds each pipeline its audio and events).
"""
