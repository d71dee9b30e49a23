"""The pure core: synchronous bookkeeping with an injected clock. No asyncio, sockets or Redis here."""
