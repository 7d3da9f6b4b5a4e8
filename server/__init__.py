"""The team tracking server without containers (``make server``). No run imports it.

One job per file: `compose` (docker-compose.yml, .env), `postgres` (binaries and a cluster),
`process` (a server's process tree), `tracking` (PostgreSQL + mlflow server), `cli` (python -m server).
"""
