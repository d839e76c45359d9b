"""The web explorer: HTTP pages and JSON endpoints served beside gRPC by the same process."""
