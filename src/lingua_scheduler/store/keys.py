"""Every Redis key, in one place (docs/redis.md documents each: type, TTL, writer, readers).

Keys used together in one script or transaction share a Redis Cluster hash slot through a ``{...}``
hash tag: the fleet directory and change stream (``{P:fleet}``), one node's reservations and state
(``{P:node:<id>}``), one instance's inbox, dead letters and job records (``{P:inst:<id>}``).
"""

from __future__ import annotations


class Keys:
    def __init__(self, prefix: str = "lingua") -> None:
        self.prefix = prefix
        fleet = f"{{{prefix}:fleet}}"
        #: hash node_id -> NodeRecord JSON (the directory; read in full only by the periodic resync)
        self.nodes = f"{fleet}:nodes"
        #: stream of NodeRecord changes and LoadBatch entries (fields: t=node|load|gone, d=JSON)
        self.changes = f"{fleet}:changes"
        #: zset node_id -> presence expiry (ms); refreshed for all owned nodes in one ZADD per tick
        self.presence = f"{fleet}:presence"
        #: zset instance_id -> presence expiry (ms)
        self.instances = f"{fleet}:instances"
        #: hash "<instance>\t<tenant>" -> that instance's live sessions of a tenant with limits
        #: (written each tick by tick.lua, which sums the live instances' fields and drops dead ones)
        self.tenant_sessions = f"{fleet}:tenant_sessions"
        #: hash instance_id -> JSON of its operator figures (address, nodes, sessions, jobs, rates),
        #: written once a second by each instance (server/cluster/cluster_view.py); dead instances' fields go
        #: with their take-over
        self.instance_info = f"{fleet}:instance_info"
        #: string: Redis TIME (ms) of the last tick of any instance (tick.lua finds stalls with it)
        self.last_tick = f"{fleet}:last_tick"
        #: set of node ids whose node tokens are revoked (SADD by the admin API, SMEMBERS by every
        #: instance's revocation sync; never expires: ids are not reused)
        self.revoked_nodes = f"{{{prefix}:auth}}:revoked"

    def tenant_counts(self, tenant_id: str) -> str:
        """hash instance -> its admitted sessions of one tenant with a session cap (admit.lua checks
        the cap against the live instances' counts and adds in one step, O(instances); a count
        counts while its instance's presence is live)."""
        return f"{{{self.prefix}:fleet}}:tenant:{tenant_id}:counts"

    def room(self, code: str) -> tuple[str, str]:
        """One room of multi-instance mode (room.lua): hash ``meta`` (room_id, created_ms, last_ms, seq)
        and hash ``members`` (session_id -> member JSON), one slot, expiring unless the room changes."""
        tag = f"{{{self.prefix}:room:{code}}}"
        return f"{tag}:meta", f"{tag}:members"

    def resume(self, session_id: str) -> str:
        """string: a detached session's ResumeRecord JSON, expiring with its resume window."""
        return f"{{{self.prefix}:resume:{session_id}}}"

    def resume_claim(self, session_id: str) -> str:
        """string: the request id of the one instance resuming the session, then the outcome
        (``handed`` / ``dead``); same slot as its record (resume.lua)."""
        return f"{{{self.prefix}:resume:{session_id}}}:claim"

    def node_resv(self, node_id: str) -> str:
        """zset reservation member (job:attempt) -> expiry ms: the node's used slots."""
        return f"{{{self.prefix}:node:{node_id}}}:resv"

    def node_state(self, node_id: str) -> str:
        """hash: status (ready|...), owner; read by the reservation script."""
        return f"{{{self.prefix}:node:{node_id}}}:state"

    def pool_members(self, pool_id: str) -> str:
        """set of node ids: membership of one pool shard (SADD/SREM, never rewritten whole)."""
        return f"{{{self.prefix}:pool:{pool_id}}}:members"

    def inbox(self, instance_id: str) -> str:
        return f"{{{self.prefix}:inst:{instance_id}}}:inbox"

    def dead_letters(self, instance_id: str) -> str:
        return f"{{{self.prefix}:inst:{instance_id}}}:dlq"

    def instance_probe(self, instance_id: str) -> str:
        """string written by the health probe (``RedisStore.ping``): a store must accept writes."""
        return f"{{{self.prefix}:inst:{instance_id}}}:probe"

    def instance_jobs(self, instance_id: str) -> str:
        """hash job_id -> "state|attempt|node_id|session_id": the live jobs an instance owns (written
        once per tick for all changed jobs; survivors fail these explicitly when the instance dies)."""
        return f"{{{self.prefix}:inst:{instance_id}}}:jobs"

    def instance_ended(self, instance_id: str) -> str:
        """stream of ended jobs (field d = JSON list of records), trimmed to the retention time."""
        return f"{{{self.prefix}:inst:{instance_id}}}:ended"

    def webhooks(self, instance_id: str) -> str:
        """stream of the webhook events an instance queued (fields: tenant, body, queued_ms, event), read
        by its group ``webhooks``; an entry is deleted once delivered or given up. Another instance
        claims the stream's entries (XAUTOCLAIM) when its instance's presence has expired."""
        return f"{{{self.prefix}:inst:{instance_id}}}:webhooks"

    @property
    def webhook_streams(self) -> str:
        """set of the instance ids that have a webhook stream (so that the survivors find a dead one's)."""
        return f"{{{self.prefix}:webhooks}}:streams"

    def usage(self, tenant_id: str, hour_ms: int) -> str:
        """hash "<src>|<tgt>|<figure>" -> the cluster's use of one tenant in one UTC hour (figures:
        received, translated, tts in seconds; jobs by outcome), HINCRBYFLOAT by every instance as it
        counts (server/usage_recorder.py), expiring after the usage retention."""
        return f"{{{self.prefix}:usage:{tenant_id}}}:{hour_ms}"

    def quota_use(self, tenant_id: str, period: str, start_ms: int) -> str:
        """hash instance_id -> the audio seconds that instance accepted for a tenant in one quota period
        (daily or monthly, from its start); every instance reads the others' fields once a second."""
        return f"{{{self.prefix}:usage:{tenant_id}}}:quota:{period}:{start_ms}"

    def idempotency(self, tenant_id: str, key: str) -> str:
        """string: the first answer of a translate request with this Idempotency-Key (SET NX with a
        TTL; "pending" while the first request runs), so a retry on any instance gets that answer."""
        return f"{{{self.prefix}:idem:{tenant_id}}}:{key}"

    def webhook_claim(self, instance_id: str) -> str:
        """string: the instance delivering a dead instance's webhook stream (SET NX PX, renewed while it
        works): one claimer at a time keeps each tenant's events in order."""
        return f"{{{self.prefix}:webhooks}}:claim:{instance_id}"
