"""The HTTP adapters: the route table and its OpenAPI document, the error boundary, the operator,
admin and integrator APIs, the stats aggregate and the dashboard."""
