"""modscan's descriptor model: architecture, augmentations, three-stage training, safetensors I/O."""
