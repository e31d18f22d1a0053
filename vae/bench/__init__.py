"""Dora-bench (`dora bench`): how well a VAE reconstructs shapes, by complexity level, and how its latents behave.

    run       the command: load models, evaluate every shape at every token count, write the outputs
    data      shape collection, complexity levels, ground truth (torch-free, so worker processes start fast)
    metrics   Chamfer / F-score / normal consistency / sharp-edge error / volume IoU on meshes and point clouds
              (also the distances of `dora bench-generation`)
    rendered  the rendered Sharp Normal Error (normal maps from eight views, edge-pixel mask)
    latent    latent quality: perturbation smoothness and interpolations
    report    results.json / results.md, token-scaling plots, the contact sheet

Nothing is imported here, so ``vae.bench.data`` stays cheap to import in worker processes.
"""
