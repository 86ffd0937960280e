"""Scale-out on Ray Serve: a thin HTTP ingress in front of N engine replicas, each running the whole
loraserve app, routed with adapter affinity (docs/scale-out.md)."""
