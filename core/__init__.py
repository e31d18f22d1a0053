"""dora_shapegen: a training stack for 3D shape generation (shape VAE -> cached latents -> text-conditioned DiT).

One import namespace over the repository's folders (setuptools package-dir mapping, see pyproject.toml):

    dora_shapegen             core/        this package: the namespace root, and the helpers every stage shares
    dora_shapegen.configs     configs/     the shipped run configs (package data)
    dora_shapegen.data        data/        meshes, watertight remesh, sampling, supervision, datasets, latent shards
    dora_shapegen.training    training/    the training core shared by both trainings
    dora_shapegen.vae         vae/         the Dora VAE, its training, latent caching; Dora-bench in vae/bench/
    dora_shapegen.diffusion   diffusion/   the text-conditioned ShapeDiT, text encoders, flow matching, sampling
    dora_shapegen.pipelines   pipelines/   the diffusers pipeline; the generation benchmark in pipelines/bench/;
                                           the apps on top (the `dora` CLI, quickstart, demo) in pipelines/apps/

The shared helpers sit here, at the bottom of the import graph (they import no stage): ``config`` (YAML run configs
into dataclasses, the shipped configs), ``metrics`` (the one Chamfer distance and volume IoU), ``seeding`` (the seed
scheme and the held-out split), ``provenance`` (init_from, weight hashes, the VAE identity of a latent cache),
``report`` (figures, Markdown tables, JSON for results files), ``runtime`` (process-wide settings of entry points).
"""

__version__ = "0.1.0"
