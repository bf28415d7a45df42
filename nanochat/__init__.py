"""nanochat-k8s: the nanochat LLM pipeline, from laptop CPU to Kubernetes."""
