"""The training core shared by `dora train-vae` and `dora train-dit` (the loop, EMA, checkpoints, token schedules).

It sits at the bottom of the import graph beside ``data``: it imports ``data`` and third-party packages only, so
``vae`` and ``diffusion`` both build on it and data still flows one way (data -> vae -> diffusion -> pipelines).
Nothing heavy is imported here; take what you need from the submodules (``training.loop.Trainer``, ...).
"""
