"""The scoring model: a small transformer encoder over a record's heartbeat sentence.

Input per record (one token row): morphology words per lead and beat, one rhythm word
per beat, and the lead of each row. Each beat becomes one vector: the mean over its
leads of (word embedding + lead embedding), plus its rhythm word's embedding and its
position. A transformer encoder reads the beat vectors; a masked mean gives the record's
`embedding`; small heads give the probabilities. Fusing the leads per beat keeps the
sequence as long as the beat count (not leads × beats), which keeps CPU scoring fast.

Pretraining predicts the words of masked beats (every lead) from their context.

Artifact: `model.safetensors` + `config.json`; `model_id` is a hash of both, checked on
load. Nothing is ever unpickled.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from ecgtok.models.tokenizer import PAD, ArtifactError, _join, _read_bytes, content_hash
from ecgtok.transforms.leads import VOCABULARY
from torch import nn

N_LEAD_IDS = len(VOCABULARY) + 1
HEADS = ("p_af", "p_noisy", "p_other_rhythm")
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
MAX_BEATS = 512


class EcgLM(nn.Module):
    """Beat-level transformer encoder with pretraining and task heads."""

    def __init__(
        self,
        vocab_size: int,
        d_model: int = 64,
        n_layers: int = 2,
        n_heads: int = 4,
        max_beats: int = MAX_BEATS,
        heads: tuple[str, ...] = HEADS,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.heads = tuple(heads)
        self.word = nn.Embedding(vocab_size, d_model, padding_idx=PAD)
        self.lead = nn.Embedding(N_LEAD_IDS, d_model)
        self.rhythm = nn.Embedding(vocab_size, d_model, padding_idx=PAD)
        self.pos = nn.Embedding(max_beats, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model, n_heads, dim_feedforward=4 * d_model, dropout=dropout, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.mlm = nn.Linear(d_model, vocab_size)
        self.task = nn.Linear(d_model, len(self.heads))

    def encode(
        self, words: torch.Tensor, rhythm: torch.Tensor, leads: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """words (B, L, T), rhythm (B, T), leads (B, L) -> beat states (B, T, D), mask (B, T)."""
        lead_present = (leads >= 0).float()  # (B, L)
        x = self.word(words) + self.lead(leads.clamp(min=0))[:, :, None, :]
        x = (x * lead_present[:, :, None, None]).sum(1) / lead_present.sum(1).clamp(min=1)[
            :, None, None
        ]
        beat_mask = rhythm != PAD  # (B, T)
        t = torch.arange(words.shape[-1], device=words.device).clamp(
            max=self.pos.num_embeddings - 1
        )
        x = x + self.rhythm(rhythm) + self.pos(t)[None]
        # A record with no beats would mask every position, and attention over nothing is
        # NaN; let it attend to its (empty) first position so it still gets a finite score.
        attend = beat_mask.clone()
        attend[:, 0] |= ~beat_mask.any(dim=1)
        h = self.encoder(x, src_key_padding_mask=~attend)
        return self.norm(h), beat_mask

    def forward(
        self, words: torch.Tensor, rhythm: torch.Tensor, leads: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        h, mask = self.encode(words, rhythm, leads)
        m = mask.float()[:, :, None]
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1.0)
        probs = torch.sigmoid(self.task(pooled))
        out = {name: probs[:, i] for i, name in enumerate(self.heads)}
        out["embedding"] = pooled
        return out

    def mlm_logits(self, words, rhythm, leads) -> torch.Tensor:
        """Per-beat word logits (B, T, V) for masked-beat pretraining."""
        h, _ = self.encode(words, rhythm, leads)
        return self.mlm(h)


# ---- turning token rows into tensors ---------------------------------------------------
def row_to_example(row: dict, max_beats: int = MAX_BEATS) -> dict[str, torch.Tensor]:
    """One token row -> the tensors the model reads (long records keep their first beats)."""
    from ecgtok.transforms.leads import lead_index

    tokens = np.asarray(row["tokens"], dtype=np.int64)
    if tokens.ndim != 2:
        tokens = tokens.reshape(len(row["lead_names"]), -1)
    rhythm = np.asarray(row["rhythm"], dtype=np.int64)
    tokens, rhythm = tokens[:, :max_beats], rhythm[:max_beats]
    leads = np.array([lead_index(n) for n in row["lead_names"]], dtype=np.int64)
    return {
        "words": torch.from_numpy(tokens),
        "rhythm": torch.from_numpy(rhythm),
        "leads": torch.from_numpy(leads),
    }


def collate(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Pad a batch of variable-length examples (leads and beats) into dense tensors."""
    n = len(examples)
    max_l = max(1, max(e["leads"].shape[0] for e in examples))
    max_t = max(1, max(e["rhythm"].shape[0] for e in examples))
    words = torch.full((n, max_l, max_t), PAD, dtype=torch.long)
    rhythm = torch.full((n, max_t), PAD, dtype=torch.long)
    leads = torch.full((n, max_l), -1, dtype=torch.long)
    for i, e in enumerate(examples):
        nl, nt = e["words"].shape
        words[i, :nl, :nt] = e["words"]
        rhythm[i, :nt] = e["rhythm"]
        leads[i, : e["leads"].shape[0]] = e["leads"]
    return {"words": words, "rhythm": rhythm, "leads": leads}


# ---- artifact ----------------------------------------------------------------------------
def save_model(model: EcgLM, config: dict, folder: str) -> str:
    """Write weights (safetensors) and config (JSON, with model_id) to `folder`."""
    from apache_beam.io.filesystems import FileSystems
    from safetensors.torch import save

    if not FileSystems.exists(folder):
        FileSystems.mkdirs(folder)
    weights = save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})
    config = {k: v for k, v in config.items() if k != "model_id"}
    config["model_id"] = content_hash(weights, _canonical(config))
    for name, data in (
        (WEIGHTS_FILE, weights),
        (CONFIG_FILE, json.dumps(config, indent=2).encode()),
    ):
        with FileSystems.create(_join(folder, name)) as f:
            f.write(data)
    return config["model_id"]


def _canonical(d: dict) -> bytes:
    return json.dumps(d, sort_keys=True, separators=(",", ":")).encode()


def load_model(folder: str, device: str = "cpu") -> tuple[EcgLM, dict]:
    """Load and verify a model directory (local or gs://) onto `device`."""
    from safetensors.torch import load

    weights = _read_bytes(_join(folder, WEIGHTS_FILE))
    try:
        config = json.loads(_read_bytes(_join(folder, CONFIG_FILE)))
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{folder}/{CONFIG_FILE} is not valid JSON: {exc}") from exc
    claimed = config.get("model_id")
    actual = content_hash(weights, _canonical({k: v for k, v in config.items() if k != "model_id"}))
    if claimed != actual:
        raise ArtifactError(
            f"model {folder} fails its content check (id {claimed!r}, content {actual!r}): "
            "the files were changed or mixed from two artifacts"
        )
    model = EcgLM(**config["arch"])
    model.load_state_dict(load(weights))
    model.eval()
    return model.to(device), config


def pick_device(requested: str) -> str:
    """'auto' means CUDA when present; 'gpu'/'cuda' fall back to CPU with no GPU."""
    r = requested.lower()
    if r in ("auto", "gpu", "cuda"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cpu"
