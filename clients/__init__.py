"""Example clients for the served ``pipeline`` model: ``http_client``, ``grpc_client`` (same API)."""
