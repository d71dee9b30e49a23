"""The multi-instance adapters: the Redis-backed cluster loop (presence, feed, inboxes, take-over),
the coalescing store writer, the cluster view, rooms across instances and session resume."""
