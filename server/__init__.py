"""The I/O shell of the persona chat server: app, session, auth, store, generators, bots."""
