"""The generation benchmark (`dora bench-generation`): how well a text-to-3D pipeline's shapes match the data and the text.

    run       the command: sample every prompt set, extract meshes, measure, write the outputs
    data      the reference shapes (prepared folder, meshes, index, builtin) and the prompt sets
    metrics   1-NNA / COV / MMD on Chamfer and EMD, the category judge, mesh structure
    report    aggregation per prompt set and category, results.json / results.md, contact sheets

Nothing is imported here, as in ``dora_shapegen.vae.bench``.
"""
