"""The data plane for inference: exported models as Ray Serve applications behind one HTTP API."""
