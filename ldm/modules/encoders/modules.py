"""Conditioning encoders (LatentDiffusion's ``cond_stage_config`` targets) for class labels and text; the text
encoders import the optional ``transformers`` package only when one is built."""

from __future__ import annotations

import itertools
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ldm.util import one_line

logger = logging.getLogger(__name__)


class ClassEmbedder(nn.Module):
    """Class labels ``batch[key]`` ``[B]`` (long) -> embeddings ``[B, 1, embed_dim]``: a cross-attention context
    (``cond_stage_key: class_label`` passes the whole batch; ``conditioning_key: crossattn``)."""

    def __init__(self, embed_dim: int, n_classes: int = 1000, key: str = "class"):
        super().__init__()
        self.key = key
        self.n_classes = n_classes
        self.embedding = nn.Embedding(n_classes, embed_dim)

    def forward(self, batch: Mapping[str, Any], key: str | None = None) -> torch.Tensor:
        return self.embedding(_labels(batch[key or self.key], self.n_classes, self.embedding.weight.device))[:, None]


def _labels(values: Any, n_classes: int, device: torch.device) -> torch.Tensor:
    labels = torch.as_tensor(values, device=device).long()
    if labels.numel() and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(f"class labels must be in [0, {n_classes}); got {labels.min()}..{labels.max()}")
    return labels


class ClassLabels(nn.Module):
    """Class labels ``batch[key]`` ``[B]`` as a long tensor, for ``conditioning_key: adm`` (UNet ``num_classes``)."""

    def __init__(self, n_classes: int, key: str = "class"):
        super().__init__()
        self.key = key
        self.n_classes = n_classes
        # follows .to(device), so that the labels land where the UNet's label embedding is (no state-dict key)
        self.register_buffer("device_anchor", torch.empty(0), persistent=False)

    def forward(self, batch: Mapping[str, Any]) -> torch.Tensor:
        return _labels(batch[self.key], self.n_classes, self.device_anchor.device)


# Text encoders: CompVis names, signatures and state-dict keys; tokenizers and weights only from local files

TEXT_EXTRA_HINT = "pip install -e .[text]"
_DROPPED_TEXT_CHARS = 80  # how much of the truncated tail a warning quotes


def _transformers() -> Any:
    """Import transformers lazily: ``import ldm.modules.encoders.modules`` must work without it."""
    try:
        import transformers
    except ImportError as err:
        if err.name not in (None, "transformers"):  # installed but broken (e.g. a dependency's version): say so
            raise ImportError(f"the 'transformers' package failed to import ({err}); reinstall it: {TEXT_EXTRA_HINT}") from err
        raise ImportError(
            f"the text encoders need the 'transformers' package, which is not installed: {TEXT_EXTRA_HINT}"
        ) from None
    return transformers


def _ignored_device(owner: str, device: Any) -> None:
    """CompVis classes take ``device`` (default "cuda"); here the module's own device is used, so it is ignored."""
    if device is not None:
        logger.info(
            "%s(device=%r): ignored; the encoder runs on the device its parameters are on (move it with .to(device))",
            owner,
            device,
        )


def _tokenize(tokenizer: Any, text: str | list[str], max_length: int, owner: str) -> torch.Tensor:
    """Prompts (a ``str`` is a batch of one) -> token ids ``[B, max_length]`` (long, CPU) with start/end tokens, padded.

    Longer prompts are truncated, as CompVis does, with one warning per call saying how many tokens each one lost.
    """
    texts = [text] if isinstance(text, str) else list(text)
    # verbose=False: transformers would otherwise add its own "longer than the maximum" warning for this untruncated pass
    full = tokenizer(texts, truncation=False, padding=False, add_special_tokens=True, verbose=False)["input_ids"]
    over = [(i, len(ids) - max_length) for i, ids in enumerate(full) if len(ids) > max_length]
    if over:
        first, _ = over[0]
        # truncation keeps the start token, max_length - 2 content tokens and the end token
        tail = tokenizer.decode(full[first][max_length - 1 : -1])
        tail = tail if len(tail) <= _DROPPED_TEXT_CHARS else tail[:_DROPPED_TEXT_CHARS] + "..."
        lost = ", ".join(f"{n} from prompt {i}" for i, n in over[:8]) + (", ..." if len(over) > 8 else "")
        logger.warning(
            "%s: %d of %d prompts exceed the %d-token limit and are truncated, dropping tokens (%s); prompt %d loses %r",
            owner,
            len(over),
            len(texts),
            max_length,
            lost,
            first,
            tail,
        )
    enc = tokenizer(texts, truncation=True, max_length=max_length, padding="max_length", return_tensors="pt")
    return enc["input_ids"]


class AbstractEncoder(nn.Module):
    """latent-diffusion's base class of conditioning encoders: ``encode`` is what LatentDiffusion calls."""

    def encode(self, *args: Any) -> Any:
        raise NotImplementedError


class _TensorDevice:
    """A read-only ``device``: where the module's parameters (or buffers) live; tokens are moved there.  Not on
    :class:`AbstractEncoder`: CompVis/SD encoders written for it assign ``self.device`` in ``__init__``."""

    @property
    def device(self) -> torch.device:
        for tensor in itertools.chain(self.parameters(), self.buffers()):
            return tensor.device
        return torch.device("cpu")


class TransformerEmbedder(_TensorDevice, AbstractEncoder):
    """Token ids ``[B, N]`` (long, ``N <= max_seq_len``) -> embeddings ``[B, N, n_embed]``: latent-diffusion's encoder
    (keys ``transformer.*``, see ``ldm.modules.x_transformer``).  ``device`` is ignored (the module's is used)."""

    def __init__(self, n_embed: int, n_layer: int, vocab_size: int, max_seq_len: int = 77, device: Any = None):
        super().__init__()
        from ldm.modules.x_transformer import Encoder, TransformerWrapper

        _ignored_device(type(self).__name__, device)
        self.transformer = TransformerWrapper(
            num_tokens=vocab_size, max_seq_len=max_seq_len, attn_layers=Encoder(dim=n_embed, depth=n_layer)
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens`` ``[B, N]`` integer ids in ``[0, vocab_size)`` -> ``[B, N, n_embed]``."""
        return self.transformer(_checked_tokens(tokens, self.transformer.num_tokens, self.device), return_embeddings=True)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)


def _checked_tokens(tokens: Any, vocab_size: int, device: torch.device) -> torch.Tensor:
    tokens = torch.as_tensor(tokens)
    if tokens.dtype.is_floating_point or tokens.dtype == torch.bool or tokens.dim() != 2:
        raise ValueError(f"token ids must be a [B, N] integer tensor; got {tuple(tokens.shape)} {tokens.dtype}")
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        raise ValueError(
            f"token ids must be in [0, {vocab_size}) (vocab_size); got {int(tokens.min())}.."
            f"{int(tokens.max())}: the tokenizer's vocabulary is larger than the embedder's"
        )
    return tokens.to(device=device, dtype=torch.long)


class BERTTokenizer(AbstractEncoder):
    """Prompts ``[B]`` -> BERT (uncased WordPiece) token ids ``[B, max_length]``, from a local vocabulary: ``vocab_path``
    (appended to the CompVis signature) names a ``vocab.txt`` or a folder written by ``BertTokenizer.save_pretrained``.
    """

    def __init__(
        self, device: Any = None, vq_interface: bool = True, max_length: int = 77, vocab_path: str | os.PathLike | None = None
    ):
        super().__init__()
        _ignored_device(type(self).__name__, device)
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (start and end tokens); got {max_length}")
        self.tokenizer = _bert_tokenizer(vocab_path)
        self.vq_interface = vq_interface
        self.max_length = max_length

    def forward(self, text: list[str]) -> torch.Tensor:
        """``text`` ``[B]`` strings -> token ids ``[B, max_length]`` (long, CPU), padded with ``[PAD]``."""
        return _tokenize(self.tokenizer, text, self.max_length, type(self).__name__)

    @torch.no_grad()
    def encode(self, text: list[str]) -> Any:
        tokens = self(text)
        if not self.vq_interface:
            return tokens
        return None, None, [None, None, tokens]

    def decode(self, text: Any) -> Any:
        return text


MAX_VOCAB_BYTES = 16 * 2**20


def _bert_tokenizer(vocab_path: str | os.PathLike | None) -> Any:
    hint = (
        "pass vocab_path= a local bert-base-uncased vocab.txt, or a folder written by "
        "BertTokenizer.save_pretrained (nothing is downloaded)"
    )
    if vocab_path is None:
        raise ValueError(f"BERTTokenizer needs a local vocabulary: {hint}")
    path = Path(vocab_path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"BERT vocabulary {str(path)!r} does not exist: {hint}")
    transformers = _transformers()
    if path.is_dir():
        if not ((path / "vocab.txt").is_file() or (path / "tokenizer.json").is_file()):
            raise FileNotFoundError(f"BERT tokenizer folder {str(path)!r} has neither vocab.txt nor tokenizer.json: {hint}")
        return transformers.BertTokenizer.from_pretrained(str(path), local_files_only=True)
    if not path.is_file() or path.stat().st_size > MAX_VOCAB_BYTES:  # a FIFO or /dev/zero would be read forever
        raise ValueError(
            f"BERT vocabulary {str(path)!r} is not a regular file of at most {MAX_VOCAB_BYTES // 2**20} MiB "
            f"(bert-base-uncased's vocab.txt has 226 KB): {hint}"
        )
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"BERT vocabulary {str(path)!r} is not UTF-8 text (one token per line): {hint}") from None
    vocab = {token: i for i, token in enumerate(lines) if token}
    missing = [t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]") if t not in vocab]
    if missing or len(vocab) != len(lines):
        why = f"lacks the special tokens {missing}" if missing else "has empty or repeated lines"
        raise ValueError(
            f"BERT vocabulary {str(path)!r} {why}; expected one unique token per line as in bert-base-uncased's vocab.txt"
        )
    # the ids are the line numbers, as in bert-base-uncased's vocab.txt (the tokenizer is built from the mapping:
    # transformers 5's BertTokenizer ignores a vocab_file argument)
    return transformers.BertTokenizer(vocab=vocab, do_lower_case=True)


class BERTEmbedder(_TensorDevice, AbstractEncoder):
    """Prompts ``[B]`` (or token ids ``[B, N]`` with ``use_tokenizer=False``) -> ``[B, max_seq_len, n_embed]``: BERT
    tokens through latent-diffusion's transformer encoder (txt2img-f8: ``n_embed: 1280, n_layer: 32``).  Padding
    tokens are attended to, as latent-diffusion's checkpoints were trained."""

    def __init__(
        self,
        n_embed: int,
        n_layer: int,
        vocab_size: int = 30522,
        max_seq_len: int = 77,
        device: Any = None,
        use_tokenizer: bool = True,
        embedding_dropout: float = 0.0,
        vocab_path: str | os.PathLike | None = None,
    ):
        super().__init__()
        from ldm.modules.x_transformer import Encoder, TransformerWrapper

        _ignored_device(type(self).__name__, device)
        self.use_tknz_fn = use_tokenizer
        if self.use_tknz_fn:
            self.tknz_fn = BERTTokenizer(vq_interface=False, max_length=max_seq_len, vocab_path=vocab_path)
            if len(self.tknz_fn.tokenizer) > vocab_size:
                raise ValueError(
                    f"the BERT vocabulary has {len(self.tknz_fn.tokenizer)} tokens but vocab_size="
                    f"{vocab_size}; pass the vocabulary the embedder was trained with"
                )
        self.transformer = TransformerWrapper(
            num_tokens=vocab_size,
            max_seq_len=max_seq_len,
            attn_layers=Encoder(dim=n_embed, depth=n_layer),
            emb_dropout=embedding_dropout,
        )

    def forward(self, text: Any) -> torch.Tensor:
        """``text`` ``[B]`` strings (or token ids ``[B, N]`` when ``use_tokenizer=False``) -> ``[B, N, n_embed]``."""
        tokens = self.tknz_fn(text) if self.use_tknz_fn else text
        return self.transformer(_checked_tokens(tokens, self.transformer.num_tokens, self.device), return_embeddings=True)

    def encode(self, text: Any) -> torch.Tensor:
        return self(text)


_CLIP_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def _clip_folders(version: str | os.PathLike) -> tuple[Path, Path]:
    """``(tokenizer folder, model folder)`` of a local CLIP text encoder: one folder holding both (laid out as
    openai/clip-vit-large-patch14) or a diffusers pipeline folder (``tokenizer/`` and ``text_encoder/``)."""
    path = Path(version).expanduser()
    hint = (
        "pass a local folder with the CLIP tokenizer files (vocab.json and merges.txt, or tokenizer.json) and "
        "config.json, e.g. one written by CLIPTokenizer.save_pretrained and CLIPTextModel.save_pretrained "
        "(nothing is downloaded)"
    )
    if not path.is_dir():
        raise FileNotFoundError(f"FrozenCLIPEmbedder(version={str(version)!r}): not a local folder; {hint}")
    tok_dir, model_dir = path, path
    if (path / "tokenizer").is_dir() and (path / "text_encoder").is_dir():  # a diffusers pipeline folder
        tok_dir, model_dir = path / "tokenizer", path / "text_encoder"
    if not (tok_dir / "tokenizer.json").is_file():
        missing = [name for name in ("vocab.json", "merges.txt") if not (tok_dir / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"CLIP folder {str(tok_dir)!r} has no tokenizer: missing {' and '.join(missing)} "
                "(or tokenizer.json); save the tokenizer into it with "
                "CLIPTokenizer.save_pretrained(folder)"
            )
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"CLIP folder {str(model_dir)!r} has no config.json; {hint}")
    return tok_dir, model_dir


MAX_CLIP_CONFIG_BYTES = 1 << 20
# what a CLIP text config may ask to be built (its sizes decide the allocation; SD v1: 768 wide, 12 layers, 49408
# tokens, 77 positions); CLIP folders and diffusers SD v1 text encoders share them
_CLIP_CONFIG_BOUNDS = {"hidden_size": 16384, "intermediate_size": 65536, "num_hidden_layers": 64,
                       "num_attention_heads": 16384, "vocab_size": 1 << 20, "max_position_embeddings": 4096}  # fmt: skip


def check_clip_config(model_dir: Path) -> None:
    """Refuse, in one line (ValueError), a ``config.json`` in ``model_dir`` that is not a bounded CLIP text config
    (``CLIPTextModel``'s, or a ``CLIPModel``'s ``text_config``), before transformers reads it: its sizes decide what is
    built, and transformers' own errors for another model's config are tracebacks of its internal classes."""
    path = model_dir / "config.json"
    where = f"CLIP folder {str(model_dir)!r}: config.json"
    if path.stat().st_size > MAX_CLIP_CONFIG_BYTES:
        raise ValueError(f"{where} is larger than {MAX_CLIP_CONFIG_BYTES:,} bytes; a CLIP config is a few KiB")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ValueError(f"{where} is not valid JSON ({one_line(exc)[:120]})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{where} must hold a JSON object, got {type(data).__name__}")
    model_type = data.get("model_type")
    text = data.get("text_config") if model_type == "clip" else data
    if model_type not in (None, "clip", "clip_text_model") or not isinstance(text, dict):
        raise ValueError(f"{where} describes model_type={str(model_type)[:40]!r}, not a CLIP text model "
                         "(clip_text_model, or clip with a text_config)")  # fmt: skip
    problem = clip_text_config_problem(text)
    if problem is not None:
        raise ValueError(f"{where}: {problem}")


def clip_text_config_problem(text: Mapping[str, Any]) -> str | None:
    """Why a CLIP text config's sizes cannot be built (an integer out of bounds, heads not dividing the width), or None:
    shared by CLIP folders and diffusers SD v1 text encoders."""
    for key, hi in _CLIP_CONFIG_BOUNDS.items():
        value = text.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= hi):
            return f"{key}={str(value)[:40]} must be an integer in [1, {hi}]"
    width, heads = text.get("hidden_size") or 512, text.get("num_attention_heads") or 8  # CLIPTextConfig's defaults
    if width % heads:
        return f"num_attention_heads={heads} does not divide hidden_size={width}"
    from transformers.activations import ACT2FN

    act = text.get("hidden_act", "quick_gelu")
    if not isinstance(act, str) or act not in ACT2FN:  # transformers raises a bare KeyError when it builds the model
        return f"hidden_act={str(act)[:40]!r} is not an activation transformers knows (CLIP uses 'quick_gelu' or 'gelu')"
    return None


def _from_folder(load: Any, folder: Path, what: str) -> Any:
    """``load()``, with what transformers raises for a damaged folder as one line naming it, and without transformers'
    progress bar on stderr (a "Loading weights" bar for a local file; this project's other loaders show none)."""
    hf_logging = _transformers().utils.logging
    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return load()
    except (FileNotFoundError, ValueError):
        raise
    except Exception as exc:  # transformers and huggingface_hub raise their own, version-dependent types
        raise ValueError(
            f"CLIP folder {str(folder)!r}: cannot read its {what} ({type(exc).__name__}: {one_line(exc)[:160]})"
        ) from None
    finally:
        if shown:
            hf_logging.enable_progress_bar()


class _TextModelKeys(nn.Module):
    """Holds a transformers>=5 ``CLIPTextModel`` as ``text_model``, so state-dict keys keep SD v1's ``text_model.*``:
    transformers 5 flattened the tree (``embeddings.*``, ``encoder.*``, ...) and renames only on its own loading."""

    def __init__(self, text_model: nn.Module):
        super().__init__()
        self.text_model = text_model

    @property
    def config(self) -> Any:
        return self.text_model.config

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None, output_hidden_states: bool = False
    ) -> Any:
        return self.text_model(input_ids=input_ids, position_ids=position_ids, output_hidden_states=output_hidden_states)


class FrozenCLIPEmbedder(_TensorDevice, AbstractEncoder):
    """Prompts ``[B]`` -> CLIP text features ``[B, max_length, D]`` (Stable Diffusion v1's condition encoder).

    ``version`` is a local folder; without weights there, they are random, to be filled by the LDM checkpoint.
    ``layer``: ``"last"`` (SD v1: the final-LayerNorm output), ``"pooled"`` (the end-token feature ``[B, 1, D]``) or
    ``"hidden"`` (hidden state ``layer_idx`` before the final LayerNorm, as in SD 2's class).
    """

    LAYERS = ("last", "pooled", "hidden")
    #: keys SD v1 checkpoints hold that this module does not (dropped by a load_state_dict pre-hook)
    checkpoint_only_keys = ("transformer.text_model.embeddings.position_ids",)

    def __init__(
        self,
        version: str = "openai/clip-vit-large-patch14",
        device: Any = None,
        max_length: int = 77,
        freeze: bool = True,
        layer: str = "last",
        layer_idx: int | None = None,
    ):
        super().__init__()
        if layer not in self.LAYERS:
            raise ValueError(f"layer must be one of {self.LAYERS}; got {layer!r}")
        tok_dir, model_dir = _clip_folders(version)
        _ignored_device(type(self).__name__, device)
        transformers = _transformers()
        check_clip_config(model_dir)
        self.tokenizer = _from_folder(
            lambda: transformers.CLIPTokenizer.from_pretrained(str(tok_dir), local_files_only=True), tok_dir, "tokenizer"
        )
        # under a meta-device context (a dry run: shapes only) weights are not read; transformers refuses to try
        dry_run = torch.empty(0).device.type == "meta"  # (torch.get_default_device needs torch >= 2.3)
        if not dry_run and any((model_dir / name).is_file() for name in _CLIP_WEIGHT_FILES):
            model = _from_folder(
                lambda: transformers.CLIPTextModel.from_pretrained(str(model_dir), local_files_only=True, dtype=torch.float32),
                model_dir,
                "text model",
            )
        else:
            logger.info(
                "%s: CLIPTextModel built from config.json with random weights (%s; load a checkpoint with "
                "cond_stage_model.transformer.* weights before use)",
                model_dir,
                "meta device" if dry_run else "no weights file",
            )
            config = _from_folder(
                lambda: transformers.CLIPTextConfig.from_pretrained(str(model_dir), local_files_only=True), model_dir, "config"
            )
            model = transformers.CLIPTextModel(config)
        # transformers < 5 already nests the text transformer under .text_model (the SD v1 key layout)
        self.transformer = model if isinstance(getattr(model, "text_model", None), nn.Module) else _TextModelKeys(model)
        n_layers = self.transformer.config.num_hidden_layers
        if layer == "hidden" and (layer_idx is None or not -n_layers - 1 <= layer_idx <= n_layers):
            raise ValueError(
                f"layer='hidden' needs layer_idx in [{-n_layers - 1}, {n_layers}] (0 = the embeddings, "
                f"-1 = the last layer); got {layer_idx}"
            )
        max_positions = self.transformer.config.max_position_embeddings
        if not 2 <= max_length <= max_positions:
            raise ValueError(
                f"max_length must be in [2, {max_positions}] (the text model's max_position_embeddings); got {max_length}"
            )
        self.max_length = max_length
        self.layer = layer
        self.layer_idx = layer_idx
        self.frozen = False
        own = set(self.state_dict())
        self._drop_on_load = tuple(k for k in self.checkpoint_only_keys if k not in own)
        self.register_load_state_dict_pre_hook(_drop_checkpoint_only_keys)
        if freeze:
            self.freeze()

    def freeze(self) -> None:
        """No gradients and eval mode (kept in eval by ``train()``), as SD's ``freeze``."""
        self.transformer = self.transformer.eval()
        self.requires_grad_(False)
        self.frozen = True

    def train(self, mode: bool = True) -> FrozenCLIPEmbedder:
        super().train(mode)
        if self.frozen:
            self.transformer.eval()
        return self

    def tokenize(self, text: list[str]) -> torch.Tensor:
        """``text`` ``[B]`` strings -> token ids ``[B, max_length]`` (long, CPU); a long prompt warns and is cut."""
        return _tokenize(self.tokenizer, text, self.max_length, type(self).__name__)

    def forward(self, text: list[str]) -> torch.Tensor:
        """``text`` ``[B]`` strings -> ``[B, max_length, D]`` (``[B, 1, D]`` for ``layer="pooled"``)."""
        tokens = self.tokenize(text).to(self.device)
        # explicit positions: the model's position_ids buffer is non-persistent, so a model built on the meta device
        # and then filled from a checkpoint would hold garbage there (and some SD v1 files store corrupted ones)
        positions = torch.arange(tokens.shape[1], device=tokens.device)[None]
        outputs = self.transformer(input_ids=tokens, position_ids=positions, output_hidden_states=self.layer == "hidden")
        if self.layer == "last":
            return outputs.last_hidden_state
        if self.layer == "pooled":
            return outputs.pooler_output[:, None, :]
        return outputs.hidden_states[self.layer_idx]

    def encode(self, text: list[str]) -> torch.Tensor:
        return self(text)


def _drop_checkpoint_only_keys(module: FrozenCLIPEmbedder, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    """load_state_dict pre-hook: drop SD v1's stored ``position_ids`` (recomputed here), so strict loading works."""
    for key in module._drop_on_load:
        if state_dict.pop(prefix + key, None) is not None:
            logger.debug("ignored %s%s from the checkpoint (a non-persistent buffer here)", prefix, key)
