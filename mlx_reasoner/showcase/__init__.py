"""Showcase commands, apart from the training core: the offline demo and strawberry test
(``demo``), the benchmark (``bench``), and the builders of random-weight model folders (``tiny``
for the demo's and tests' small models, ``shapes`` for the real Qwen2.5 shapes)."""
