"""loraplex.adapters: the registry and the contract shared by the trainer and the server.

Nothing here imports torch, vllm or peft at import time; the server and the trainer both
depend on this package and never on each other.
"""
