"""Stage 3, the board side (numpy + stdlib only; a TFLite interpreter is found at run time).

interpreter: find an interpreter, load a model.   quant: affine quantization as TFLite does it.
manifest: the export manifest.   noise: inference-time noise.   runner: raw pixels -> the head's features.
bench: device benchmark.   wire: authenticated feature frames.   client: HTTP client for the cloud.
registry: name -> component lookups that every stage shares (defenses, attacks, archs).
Nothing is imported here: `import edgeveil.device.runner` etc. loads what it needs.
"""

__all__ = ["interpreter", "quant", "manifest", "noise", "runner", "bench", "wire", "client", "registry"]
