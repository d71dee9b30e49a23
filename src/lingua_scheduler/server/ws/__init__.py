"""The WebSocket adapters: the node and session endpoints, the integrators' stream, the receive loop and
the outboxes that write to peers. They turn frames into the runtime's calls and actions into frames."""
