"""Benchmarks: this server side by side with a bare websockets echo server (`python -m bench`)."""
