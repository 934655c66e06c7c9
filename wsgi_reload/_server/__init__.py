"""A server's watcher process, its channel to the workers (the runtime directory, their records,
the generations), the reload strategies and the worker-side agent.
"""
