"""Data side of `dora train-vae`: held-out split, resumable seeded data order, batching of prepared samples."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch

from dora_shapegen.errors import ConfigError
from dora_shapegen.seeding import derive_seed, split_indices

# What data.prepare.PreparedDataset items hold: uniform/salient (N, 6) xyz+normal, supervision (M, ...).
TENSOR_KEYS = ("uniform", "salient", "sup_points", "sup_occupancy", "sup_tsdf", "sup_group")


class EpochPermutationSampler(torch.utils.data.Sampler[tuple[int, int]]):
    """Yields ``(item, draw seed)`` pairs: a permutation seeded by (seed, epoch), identical on all ranks and
    replayable on resume; the draw seed fixes the item's random point subsets (see :class:`SeededItems`)."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "vae-epoch-order", self.epoch))
        order = torch.randperm(self.size, generator=generator).tolist()
        return iter(
            (item, derive_seed(self.seed, "vae-item-draw", self.epoch, position))
            for position, item in enumerate(order)
        )

    def __len__(self) -> int:
        return self.size


class SeededItems(torch.utils.data.Dataset):
    """``dataset[indices[i]]`` with torch's RNG seeded per draw.

    PreparedDataset draws its point subsets from torch's global RNG; the DataLoader fetches one batch ahead, so
    that draw would depend on when the loader was (re)started. Seeding each item from the sampler makes the
    subsets a function of (seed, epoch, position): a resumed run sees exactly the batches of an uninterrupted one.
    """

    def __init__(self, dataset: Any, indices: list[int]) -> None:
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Any]:
        position, draw_seed = key if isinstance(key, tuple) else (key, key)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(draw_seed)
            return self.dataset[self.indices[position]]


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the tensors; keep ``meta`` as a list (its nested JSON values do not collate)."""
    batch = {key: torch.stack([item[key] for item in items]) for key in TENSOR_KEYS}
    if "codes" in items[0]:  # CodedItems: the decoder reads these codes instead of the encoder's
        batch["codes"] = torch.stack([item["codes"] for item in items])  # (B, N, C)
    batch["meta"] = [item.get("meta", {}) for item in items]
    return batch


def shape_ids_of(dataset: Any) -> list[str]:
    """Shape ids in dataset order, from the dataset's file list when it has one (no need to load every item)."""
    for attribute in ("shape_ids", "files", "paths"):
        values = getattr(dataset, attribute, None)
        if values is not None and len(values) == len(dataset):
            return [Path(v).stem if attribute != "shape_ids" else str(v) for v in values]
    return [str(dataset[i]["meta"].get("shape_id", i)) for i in range(len(dataset))]


def model_point_counts(model: dict[str, Any]) -> tuple[int, int]:
    """The encoder's input point counts (n_uniform, n_salient) of a ``model:`` section, DoraVAE's defaults for keys
    it leaves out."""
    from dora_shapegen.vae.modeling_dora_vae import DoraVAE

    defaults = inspect.signature(DoraVAE.__init__).parameters
    return tuple(int(model.get(key, defaults[key].default)) for key in ("n_uniform", "n_salient"))


def build_datasets(config: Any, root: str) -> tuple[Any, Any, list[int], list[int]]:
    """(training dataset, validation dataset, train indices, held-out indices) from a prepared folder."""
    from dora_shapegen.data.prepare import PreparedDataset

    if not (Path(root) / "samples").is_dir():
        raise FileNotFoundError(
            f"prepared data not found: {root}/samples (run `dora prepare --builtin 240 --out {root}`)"
        )
    data = config.data
    model_uniform, model_salient = model_point_counts(config.model)
    n_uniform = data.n_uniform if data.n_uniform is not None else model_uniform
    n_salient = data.n_salient if data.n_salient is not None else model_salient
    train_set = PreparedDataset(
        root,
        n_uniform=n_uniform,
        n_salient=n_salient,
        n_supervision=data.n_supervision,
        seed=config.training.seed,
        cache_in_memory=data.cache_in_memory,
    )
    # Validation uses all supervision points: a stable IoU estimate.
    val_set = PreparedDataset(
        root,
        n_uniform=n_uniform,
        n_salient=n_salient,
        seed=config.training.seed,
        cache_in_memory=data.cache_in_memory,
    )
    train_idx, val_idx = split_indices(shape_ids_of(train_set), data.val_fraction)
    if not train_idx:
        raise ConfigError(f"{root}: no training shapes (found {len(train_set)} samples)")
    return train_set, val_set, train_idx, val_idx


# ------------------------------------------------------------------------------------ generated codes (refine)
CODES_FILE = "codes.safetensors"
CODES_INFO = "codes.json"


class CodeTable:
    """A `dora sample-codes` folder: per training shape its clean cached code and the codes the DiT made from it.

    ``codes.safetensors`` holds ``codes`` (P, N, C) in the VAE's latent space, ``shape_index`` (P,) into
    ``codes.json``'s ``shape_ids`` and ``sigma`` (P,), the noise level each code was denoised from (0 = the clean
    cached code). Bad input raises a ValueError naming the folder and what is wrong.
    """

    def __init__(self, folder: str | Path) -> None:
        import json

        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / CODES_FILE).is_file() or not (folder / CODES_INFO).is_file():
            raise FileNotFoundError(
                f"{folder}: not a `dora sample-codes` output (needs {CODES_FILE} and {CODES_INFO})"
            )
        try:
            tensors = load_file(str(folder / CODES_FILE))
            self.info = json.loads((folder / CODES_INFO).read_text())
        except Exception as error:  # a torn or foreign file: name it
            raise ValueError(f"{folder}: cannot read the codes ({error})") from None
        missing = [key for key in ("codes", "shape_index", "sigma") if key not in tensors]
        if missing or "shape_ids" not in self.info:
            raise ValueError(f"{folder}: codes file lacks {missing or ['shape_ids']}")
        self.folder = folder
        self.codes = tensors["codes"].float()  # (P, N, C)
        self.sigma = tensors["sigma"].float()  # (P,)
        shape_index = tensors["shape_index"].long()  # (P,)
        self.shape_ids = [str(shape_id) for shape_id in self.info["shape_ids"]]
        if self.codes.dim() != 3 or len(shape_index) != len(self.codes) or len(self.sigma) != len(self.codes):
            raise ValueError(
                f"{folder}: codes {tuple(self.codes.shape)}, shape_index and sigma do not line up"
            )
        if len(shape_index) and (shape_index.min() < 0 or shape_index.max() >= len(self.shape_ids)):
            raise ValueError(f"{folder}: shape_index points outside the {len(self.shape_ids)} shape ids")
        # Rows per shape: its clean code (sigma 0) and its generated ones.
        self.clean: dict[str, int] = {}
        self.generated: dict[str, list[int]] = {}
        for row, (index, sigma) in enumerate(zip(shape_index.tolist(), self.sigma.tolist())):
            shape_id = self.shape_ids[index]
            if sigma == 0.0:
                self.clean[shape_id] = row
            else:
                self.generated.setdefault(shape_id, []).append(row)

    def covers(self, shape_id: str) -> bool:
        return shape_id in self.clean or shape_id in self.generated

    def draw(self, shape_id: str, clean_fraction: float) -> torch.Tensor:
        """One code (N, C) of the shape from torch's RNG (seeded per draw by :class:`SeededItems`): the clean one
        with probability ``clean_fraction`` (or when the shape has no generated code), else a generated one."""
        generated = self.generated.get(shape_id, [])
        if shape_id in self.clean and (not generated or float(torch.rand(())) < clean_fraction):
            return self.codes[self.clean[shape_id]]
        return self.codes[generated[int(torch.randint(len(generated), ()))]]


class CodedItems(torch.utils.data.Dataset):
    """A prepared dataset whose items also carry ``codes`` (N, C), drawn from a :class:`CodeTable` for the item's
    shape: the decoder is trained on what the DiT makes, with the shape's supervision as the target."""

    def __init__(self, dataset: Any, table: CodeTable, clean_fraction: float) -> None:
        self.dataset, self.table, self.clean_fraction = dataset, table, clean_fraction
        self.shape_ids = shape_ids_of(dataset)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = dict(self.dataset[index])  # a copy: an in-memory dataset hands out its cached dict
        item["codes"] = self.table.draw(self.shape_ids[index], self.clean_fraction)
        return item
