"""The live page served at ``/``: static files, no build step, no CDN (see gateway.http)."""
