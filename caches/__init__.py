"""tierserve's cache library: result, semantic, KV-adjacent and tiered feature caches.

No Ray imports here: every module is usable from any Python process (a Serve replica, a
benchmark, a notebook). `deployments/` wires these into Ray Serve.
"""
