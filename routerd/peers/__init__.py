"""Peers: other hosts (routerd, Ollama, llama-server, any OpenAI-compatible server) whose
models routerd lists and forwards to, and replicas of one model across places.

- peer.py: one peer's poller, health and in-flight count
- kinds.py: what each kind answers, read into one shape (pure)
- peers.py: every peer by name; the naming rule; listings
- replicas.py: where a request for a model served at several places goes (pure)
- router.py: the dispatcher's placement over the scheduler and the peers
"""
