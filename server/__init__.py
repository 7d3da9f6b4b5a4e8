"""The team tracking server without containers (``make server``); see `server.stack`. No run imports it."""
