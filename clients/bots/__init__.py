"""The load-test bots: real WebSocket clients that chat, switch persona and check every answer."""
