"""A pipeline shared by many processes over one Redis (install the ``redis`` extra).

``spawn_pipeline(worker, config, redis_url=..., role=...)`` starts one process's part:
request records, the work queue and the token streams live in Redis, so any replica
answers for any request, workers take work from one queue by priority, and a crashed
worker's requests run again elsewhere. ``ClusterConfig`` tunes the sharing (key prefix,
shared capacity, lease reclaim, dead-lettering). docs/scale-out.md has the topologies and
the guarantees.
"""

from __future__ import annotations

from orchestrator.distributed._cluster import ClusterConfig, Role

__all__ = ["ClusterConfig", "Role"]
