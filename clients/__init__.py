"""Clients that speak only the wire: the link, the terminal client and the load-test bots."""
