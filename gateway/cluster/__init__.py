"""Cluster mode: gateway processes on one or many machines share meetings through Redis.

Without ``--redis-url`` none of this is imported and the gateway is one process. With
it, every process is a *node*:

- :mod:`.node` keeps the node alive in Redis (a heartbeat), owns sessions by lease,
  hands a session over when its bot turns up at another node, adopts the sessions of
  a node that died, and publishes what ``GET /sessions`` shows cluster-wide. A node
  that loses Redis keeps ingesting and recording what it has and catches up when
  Redis is back.
- :mod:`.supervisor` runs ``serve --workers N``: N nodes on one port (SO_REUSEPORT).

Redis holds only small, expiring facts (owners, heartbeats, summaries); audio and
transcripts stay in the data directory, which nodes share so that a session moved to
another node continues the same files.
"""
