"""Generation server: request protocol, service layer, HTTP app and worker loop."""
