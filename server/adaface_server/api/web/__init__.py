"""HTTP/JSON face of the service and its web console, served beside gRPC on the same loop."""
