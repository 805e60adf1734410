"""Weight interop: the official Kandinsky 3.0/3.1 checkpoints and the diffusers layout, in and out.

Key maps are built by enumerating k3lab's own keys for a given configuration and renaming each one, so a
conversion is strict: every missing, unexpected or mis-shaped key is an error that names it.
"""
