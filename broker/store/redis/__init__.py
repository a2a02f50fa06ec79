"""Cluster mode: the Redis store and cluster-wide presence (imported only with ``--redis``)."""

from broker.store.redis.presence import Cluster
from broker.store.redis.store import RedisStore

__all__ = ["Cluster", "RedisStore"]
