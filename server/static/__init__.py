"""The web chat page, served at GET / (static files, no build step)."""
