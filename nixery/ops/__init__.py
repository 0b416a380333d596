"""Operating the registry: logs, metrics, health checks, build progress and garbage collection."""
