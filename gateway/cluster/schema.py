"""What cluster nodes keep in Redis: key names, the lease scripts, the node's metrics.

See :mod:`gateway.cluster.node` for what each key means.
"""

from __future__ import annotations

import os
import socket

from prometheus_client import CollectorRegistry, Counter, Gauge

PREFIX = "gateway:"

# Each script is one round trip and atomic: a lease is never taken from a live owner.
RENEW = """
local out = {}
for i, k in ipairs(KEYS) do
  local cur = redis.call('get', k)
  if cur == ARGV[1] then redis.call('pexpire', k, ARGV[2]); out[i] = 1
  elseif not cur then redis.call('set', k, ARGV[1], 'px', ARGV[2]); out[i] = 2
  else out[i] = 0 end
end
return out
"""
RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""
TAKE = """
local cur = redis.call('get', KEYS[1])
if not cur or cur == ARGV[2] or cur == ARGV[1] then
  redis.call('set', KEYS[1], ARGV[1], 'px', ARGV[3]); return 1
end
return 0
"""


def owner_key(key: str) -> str:
    return f"{PREFIX}owner:{key}"


def node_key(node: str) -> str:
    return f"{PREFIX}node:{node}"


def sessions_key(node: str) -> str:
    return f"{PREFIX}sessions:{node}"


def handoff_channel(node: str) -> str:
    return f"{PREFIX}handoff:{node}"


NODES = f"{PREFIX}nodes"


def default_node_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class ClusterMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.redis_up = Gauge(
            "gateway_cluster_redis_up",
            "1 while the node's last Redis call succeeded",
            registry=registry,
        )
        self.redis_errors = Counter(
            "gateway_cluster_redis_errors",
            "Redis calls that failed, by operation; the node goes on locally",
            ["op"],
            registry=registry,
        )
        self.claims = Counter(
            "gateway_cluster_claims",
            "Sessions this node became owner of, by how: free, handed (a live owner gave it"
            " up), taken (its owner was dead or silent), adopted (an orphan's sweep), local"
            " (Redis unreachable: claimed without it)",
            ["how"],
            registry=registry,
        )
        self.handoffs = Counter(
            "gateway_cluster_handoffs",
            "Sessions this node gave up, by reason: asked (the bot reached another node),"
            " lost (another node holds the lease)",
            ["reason"],
            registry=registry,
        )
        self.owned = Gauge(
            "gateway_cluster_sessions_owned", "Session leases this node holds", registry=registry
        )
