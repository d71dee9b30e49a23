"""The I/O shell: aiohttp endpoints, background tasks and metrics around the pure core."""
