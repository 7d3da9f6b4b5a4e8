"""The team tracking server without containers (``make server``). No run imports it.

One job per file: `compose` (docker-compose.yml, .env), `postgres` (binaries and a cluster),
`process` (ports, logs), `tracking` (PostgreSQL + mlflow server), `cli` (python -m server).
"""
