"""Embedding heads: small classifiers (an MLP or a linear layer) on CLIP image embeddings.

LAION's aesthetic and NSFW predictors are such heads: a few linear layers reading a CLIP model's image
embedding.  A head here is a directory (any fsspec URL) of two files:

- `head.json`: `layers` (widths from the embedding dim to 1, e.g. `[64, 32, 1]`), `activation` between the
  layers (`relu`, `gelu` or `none`: LAION's aesthetic MLP has none), `output` (the score's name, which becomes
  a column name), optional `normalize` (L2-normalise the embedding first, as LAION's predictor expects) and
  `sigmoid` (squash the output to (0, 1)).
- `head.safetensors`: the weights, `layers.<i>.weight` (out, in) and `layers.<i>.bias` (out,) for the i-th
  linear layer.  Weights are only ever read with safetensors: nothing is unpickled.

Importing this module is light (no torch); torch is imported by the functions that need it.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from pipelines import storage

if TYPE_CHECKING:
    import numpy as np

CONFIG_FILE = "head.json"
WEIGHTS_FILE = "head.safetensors"
ACTIVATIONS = ("relu", "gelu", "none")
# the score becomes a column of the working table, ledger and curated shards, and part of a metric key
OUTPUT_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")


@dataclass(frozen=True, kw_only=True)
class HeadConfig:
    layers: tuple[int, ...]
    activation: str
    output: str
    normalize: bool = False
    sigmoid: bool = False

    @property
    def input_dim(self) -> int:
        return self.layers[0]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor the weights file must hold, with its shape."""
        out: dict[str, tuple[int, ...]] = {}
        for i, (n_in, n_out) in enumerate(zip(self.layers, self.layers[1:], strict=False)):
            out[f"layers.{i}.weight"] = (n_out, n_in)
            out[f"layers.{i}.bias"] = (n_out,)
        return out

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "layers": list(self.layers)}


def head_config(data: HeadConfig | dict[str, Any], where: str = "head config") -> HeadConfig:
    """A validated HeadConfig from a parsed `head.json` (or one already built); errors name `where` and the key."""
    if isinstance(data, HeadConfig):
        data = data.to_json()
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}")
    known = {"layers", "activation", "output", "normalize", "sigmoid"}
    if unknown := sorted(set(data) - known):
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    if missing := [k for k in ("layers", "activation", "output") if k not in data]:
        raise ValueError(f"{where}: missing {', '.join(missing)}")
    layers = data["layers"]
    if (not isinstance(layers, list | tuple) or len(layers) < 2
            or not all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in layers)):
        raise ValueError(f"{where}: layers must be a list of at least 2 positive integer widths, from the embedding "
                         f"dim to 1 (e.g. [64, 32, 1]), got {layers!r}")
    if layers[-1] != 1:
        raise ValueError(f"{where}: layers must end with 1 (one score per image), got {list(layers)}")
    if data["activation"] not in ACTIVATIONS:
        raise ValueError(f"{where}: activation must be one of {', '.join(ACTIVATIONS)}, got {data['activation']!r}")
    if not isinstance(data["output"], str) or not OUTPUT_NAME.match(data["output"]):
        raise ValueError(f"{where}: output must be a score name of lower-case letters, digits and _ "
                         f"(starting with a letter, at most 63), got {data['output']!r}")
    for key in ("normalize", "sigmoid"):
        if not isinstance(data.get(key, False), bool):
            raise ValueError(f"{where}: {key} must be true or false, got {data[key]!r}")
    return HeadConfig(layers=tuple(layers), activation=data["activation"], output=data["output"],
                      normalize=data.get("normalize", False), sigmoid=data.get("sigmoid", False))


def read_config(directory: str) -> HeadConfig:
    """The head's config from `<directory>/head.json`, validated (no weights read, no torch)."""
    url = storage.join(directory, CONFIG_FILE)
    if not storage.is_file(url):
        raise FileNotFoundError(f"head {directory}: no {CONFIG_FILE}")
    try:
        data = storage.read_json(url)
    except json.JSONDecodeError as exc:
        raise ValueError(f"head {url}: not valid JSON ({exc})") from None
    return head_config(data, f"head {url}")


def check_state(config: HeadConfig, state: dict[str, Any], where: str) -> None:
    """Raise ValueError naming `where` and the tensor when `state` does not hold exactly the config's tensors."""
    expected = config.shapes()
    if missing := [k for k in expected if k not in state]:
        raise ValueError(f"{where}: tensor {missing[0]} missing (layers {list(config.layers)} need "
                         f"{', '.join(expected)})")
    if unexpected := sorted(set(state) - set(expected)):
        raise ValueError(f"{where}: unexpected tensor {unexpected[0]} (layers {list(config.layers)} need "
                         f"{', '.join(expected)})")
    for key, shape in expected.items():
        got = tuple(state[key].shape)
        if got != shape:
            raise ValueError(f"{where}: tensor {key} has shape {got}, but layers {list(config.layers)} "
                             f"make it {shape}")


@lru_cache(maxsize=1)
def _module_class() -> Any:
    """The head's torch module class, defined on first use so that importing this module needs no torch."""
    import torch

    class EmbeddingHead(torch.nn.Module):
        def __init__(self, config: HeadConfig) -> None:
            super().__init__()
            self.config = config
            self.layers = torch.nn.ModuleList(
                torch.nn.Linear(n_in, n_out) for n_in, n_out in zip(config.layers, config.layers[1:], strict=False))
            self.act = {"relu": torch.nn.ReLU(), "gelu": torch.nn.GELU(), "none": torch.nn.Identity()}[config.activation]

        def logits(self, x: torch.Tensor) -> torch.Tensor:
            """The last layer's output before any sigmoid, one value per row."""
            x = x.float()
            if self.config.normalize:
                x = torch.nn.functional.normalize(x, dim=-1)
            for i, layer in enumerate(self.layers):
                x = layer(x)
                if i < len(self.layers) - 1:
                    x = self.act(x)
            return x.squeeze(-1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.logits(x)
            return torch.sigmoid(out) if self.config.sigmoid else out

    return EmbeddingHead


def build_head(config: HeadConfig | dict[str, Any], state: dict[str, Any] | None = None) -> Any:
    """The head as a torch module in eval mode (float32, CPU): `module(embeddings) -> scores` of shape (n,)."""
    config = head_config(config)
    module = _module_class()(config)
    if state is not None:
        check_state(config, state, "head weights")
        module.load_state_dict({k: v.float() for k, v in state.items()})
    return module.eval()


def save_head(directory: str, config: HeadConfig | dict[str, Any], state: dict[str, Any]) -> None:
    """Write `head.json` and `head.safetensors` under `directory` (any fsspec URL), each atomically."""
    from safetensors.torch import save

    config = head_config(config)
    check_state(config, state, f"head {directory}")
    blob = save({k: v.detach().float().contiguous().cpu() for k, v in state.items()},
                metadata={"format": "pt", "clipline": "embedding-head"})
    storage.atomic_write(storage.join(directory, WEIGHTS_FILE), blob)
    storage.atomic_write(storage.join(directory, CONFIG_FILE),
                         (json.dumps(config.to_json(), indent=2) + "\n").encode())


def load_head(directory: str) -> tuple[Any, HeadConfig]:
    """(torch module in eval mode, config) of the head under `directory`; the weights are read with safetensors
    only, and every tensor's presence and shape is checked against the config."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    config = read_config(directory)
    url = storage.join(directory, WEIGHTS_FILE)
    if not storage.is_file(url):
        raise FileNotFoundError(f"head {directory}: no {WEIGHTS_FILE} (weights are read from safetensors only)")
    fs, path = storage.filesystem(url)
    with fs.open(path, "rb") as f:
        blob = f.read()
    try:
        state = load(blob)
    except (SafetensorError, ValueError) as exc:
        raise ValueError(f"head {url}: not a safetensors file ({exc})") from None
    check_state(config, state, f"head {url}")
    module = _module_class()(config)
    module.load_state_dict({k: v.float() for k, v in state.items()})
    return module.eval(), config


def score(module: Any, embeddings: Any) -> np.ndarray:
    """The head's scores (float32 numpy, one per row) for a (n, dim) array or tensor of embeddings."""
    import torch

    x = torch.as_tensor(embeddings, dtype=torch.float32)
    with torch.inference_mode():
        return module(x).cpu().numpy().astype("float32")


def train_head(embeddings: Any, labels: Any, config: HeadConfig | dict[str, Any], steps: int = 300,
               seed: int = 0, lr: float = 1e-2, weight_decay: float = 1e-4) -> dict[str, Any]:
    """Fit a small head on (n, dim) embeddings, full batch with AdamW; its state dict for `save_head`.

    With `sigmoid` the labels are targets in [0, 1] (binary cross-entropy on the logits); without, the head
    regresses them (mean squared error).  Deterministic for a seed on one machine."""
    import torch

    config = head_config(config)
    x = torch.as_tensor(embeddings, dtype=torch.float32)
    y = torch.as_tensor(labels, dtype=torch.float32).reshape(-1)
    if x.ndim != 2 or x.shape[1] != config.input_dim:
        raise ValueError(f"train_head: embeddings of shape {tuple(x.shape)}, but layers {list(config.layers)} "
                         f"read ({x.shape[0] if x.ndim else 'n'}, {config.input_dim})")
    if len(y) != len(x):
        raise ValueError(f"train_head: {len(x)} embeddings but {len(y)} labels")
    if config.sigmoid and ((y < 0) | (y > 1)).any():
        raise ValueError("train_head: a sigmoid head's labels must lie in [0, 1]")
    torch.manual_seed(seed)
    module = _module_class()(config)
    module.train()
    opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn = torch.nn.BCEWithLogitsLoss() if config.sigmoid else torch.nn.MSELoss()
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(module.logits(x), y)
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in module.state_dict().items()}
