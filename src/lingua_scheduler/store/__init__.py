"""The state-store boundary: what scheduler instances share, behind one interface.

``StateStore`` (base.py) is the only way the rest of the scheduler reaches shared state: node
directory and presence, ownership, pool membership, capacity reservations, job records and messages
between instances. ``MemoryStore`` is the embedded default (one instance, everything local);
``RedisStore`` shares it through Redis (single server or Redis Cluster). No Redis call lives
anywhere else.
"""
