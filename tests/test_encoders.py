"""Text condition encoders: SD v1's FrozenCLIPEmbedder and latent-diffusion's BERT/Transformer embedders.

Tiny random models and tiny vocabularies written by the tests; nothing is downloaded (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import re
import shutil
import string
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import ldm.modules.encoders.modules as enc  # noqa: E402
import ldm.modules.x_transformer as xt  # noqa: E402
from ldm.modules.encoders.modules import (  # noqa: E402
    AbstractEncoder,
    BERTEmbedder,
    BERTTokenizer,
    FrozenCLIPEmbedder,
    TransformerEmbedder,
)

ROOT = Path(__file__).resolve().parents[1]
D = 32  # tiny CLIP width
BERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "cat", "##s"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def _write_clip_tokenizer(folder: Path) -> dict[str, int]:
    """A byte-level BPE vocabulary of single letters (one merge, "c a"), saved as CLIPTokenizer.save_pretrained does."""
    src = folder / "src"
    src.mkdir(parents=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in string.ascii_lowercase:
            vocab[c + suffix] = len(vocab)
    vocab["ca"] = len(vocab)
    (src / "vocab.json").write_text(json.dumps(vocab))
    (src / "merges.txt").write_text("#version: 0.2\nc a\n")
    transformers.CLIPTokenizer.from_pretrained(str(src), local_files_only=True).save_pretrained(str(folder))
    shutil.rmtree(src)
    return vocab


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("clip")
    vocab = _write_clip_tokenizer(folder)
    config = transformers.CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=D,
        intermediate_size=2 * D,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    torch.manual_seed(0)
    transformers.CLIPTextModel(config).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def clip(clip_dir) -> FrozenCLIPEmbedder:
    return FrozenCLIPEmbedder(str(clip_dir))


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert msg and "\n" not in msg, msg
    return msg


# ----------------------------------------------------------------------------------------------- FrozenCLIPEmbedder
def test_clip_loads_offline_and_matches_the_saved_model(clip, clip_dir):
    z = clip(["a cat", "the dog", ""])
    assert z.shape == (3, 77, D) and z.dtype == torch.float32 and torch.isfinite(z).all()
    tokens = clip.tokenize(["a cat"])
    # <|startoftext|>, "a</w>", "ca" (the merge), "t</w>", <|endoftext|>, then <|endoftext|> padding to 77
    assert tokens.shape == (1, 77) and tokens[0, :5].tolist() == [0, 28, 54, 47, 1] and (tokens[0, 5:] == 1).all()
    # the weights are the saved ones (not a random init): transformers' own model on the same tokens agrees
    reference = transformers.CLIPTextModel.from_pretrained(str(clip_dir), local_files_only=True).eval()
    with torch.no_grad():
        expected = reference(input_ids=tokens).last_hidden_state
    assert torch.allclose(clip(["a cat"]), expected, atol=1e-6)
    assert clip.encode(["a cat"]).shape == (1, 77, D)


def test_clip_loads_without_transformers_progress_bar(clip_dir, capfd):
    """transformers 5 drew a "Loading weights" bar on stderr for a local folder (convert_diffusers.py, refine.py); its
    own setting is restored afterwards."""
    capfd.readouterr()
    FrozenCLIPEmbedder(str(clip_dir))
    assert "Loading weights" not in capfd.readouterr().err
    assert transformers.utils.logging.is_progress_bar_enabled()


def test_clip_is_deterministic_and_batch_independent(clip):
    a = clip(["a cat", "zebra stripes"])
    b = clip(["a cat", "zebra stripes"])
    assert torch.equal(a, b)
    assert torch.allclose(clip(["zebra stripes"])[0], a[1], atol=1e-5)
    assert not torch.allclose(a[0], a[1])
    assert torch.equal(clip("a cat"), clip(["a cat"]))  # one string is a batch of one


def test_clip_truncation_warns_once_with_the_dropped_count(clip, caplog):
    long_prompt = "x" * 100  # 100 single-letter tokens + start + end = 102: 25 over the 77 limit
    with caplog.at_level(logging.WARNING, logger=enc.__name__):
        z = clip(["a cat", long_prompt, "y" * 80])
    assert z.shape == (3, 77, D)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == enc.__name__]
    assert len(warnings) == 1
    msg = warnings[0].getMessage()
    assert "2 of 3 prompts" in msg and "25 from prompt 1" in msg and "5 from prompt 2" in msg, msg
    assert "'" + "x" * 25 + "'" in msg  # the lost end of the first truncated prompt is quoted
    tokens = clip.tokenize([long_prompt])
    assert tokens[0, 0] == 0 and tokens[0, -1] == 1  # the end token is kept after truncation
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=enc.__name__):
        clip(["a cat"])
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_clip_folder_without_tokenizer_is_one_line(clip_dir, tmp_path):
    folder = tmp_path / "no_tokenizer"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(clip_dir / name, folder / name)
    with pytest.raises(FileNotFoundError) as err:
        FrozenCLIPEmbedder(str(folder))
    msg = _one_line(err)
    assert "no tokenizer" in msg and "vocab.json" in msg and "merges.txt" in msg and "save_pretrained" in msg


def test_clip_not_a_folder_is_one_line_and_downloads_nothing(tmp_path, clip_dir):
    for version in ("openai/clip-vit-large-patch14", str(tmp_path / "missing"), str(clip_dir / "config.json")):
        with pytest.raises(FileNotFoundError) as err:
            FrozenCLIPEmbedder(version)
        msg = _one_line(err)
        assert "not a local folder" in msg and "nothing is downloaded" in msg
    no_config = tmp_path / "no_config"
    _write_clip_tokenizer(no_config)
    with pytest.raises(FileNotFoundError) as err:
        FrozenCLIPEmbedder(str(no_config))
    assert "config.json" in _one_line(err)


def test_clip_frozen_means_no_grad_and_eval(clip_dir):
    frozen = FrozenCLIPEmbedder(str(clip_dir), device="cuda")  # the CompVis device argument is ignored, not used
    assert frozen.device.type == "cpu"
    assert not any(p.requires_grad for p in frozen.parameters())
    frozen.train()
    assert not frozen.transformer.training and not any(m.training for m in frozen.transformer.modules())
    trainable = FrozenCLIPEmbedder(str(clip_dir), freeze=False).train()
    assert all(p.requires_grad for p in trainable.parameters()) and trainable.transformer.training
    trainable.freeze()
    assert not trainable.transformer.training and not any(p.requires_grad for p in trainable.parameters())


def test_clip_state_dict_is_sd_v1_layout_and_tolerates_position_ids(clip, clip_dir):
    sd = clip.state_dict()
    assert all(k.startswith("transformer.text_model.") for k in sd), list(sd)[:3]
    assert "transformer.text_model.final_layer_norm.weight" in sd
    assert "transformer.text_model.embeddings.position_ids" not in sd  # non-persistent in transformers 5
    # an SD v1 checkpoint's cond_stage_model.* part: the weights plus the stored position_ids, loaded strict
    other = FrozenCLIPEmbedder(str(clip_dir))
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    ckpt = {k: v.clone() for k, v in sd.items()}
    ckpt["transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    result = other.load_state_dict(ckpt, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert "transformer.text_model.embeddings.position_ids" in ckpt  # the caller's dict is left alone
    assert torch.equal(other(["a cat"]), clip(["a cat"]))
    # nested, as inside LatentDiffusion (prefix cond_stage_model.)
    holder = torch.nn.Module()
    holder.cond_stage_model = other
    nested = {"cond_stage_model." + k: v for k, v in ckpt.items()}
    assert not holder.load_state_dict(nested, strict=True).unexpected_keys


def test_clip_forward_does_not_trust_the_position_ids_buffer(clip_dir):
    emb = FrozenCLIPEmbedder(str(clip_dir))
    expected = emb(["a cat"])
    emb.transformer.text_model.embeddings.position_ids.fill_(0)  # e.g. after a meta-device build filled by assign
    assert torch.equal(emb(["a cat"]), expected)


def test_clip_layers(clip_dir):
    pooled = FrozenCLIPEmbedder(str(clip_dir), layer="pooled")(["a cat", "dog"])
    hidden = FrozenCLIPEmbedder(str(clip_dir), layer="hidden", layer_idx=-2)(["a cat", "dog"])
    assert pooled.shape == (2, 1, D) and hidden.shape == (2, 77, D)
    with pytest.raises(ValueError):
        FrozenCLIPEmbedder(str(clip_dir), layer="hidden")
    with pytest.raises(ValueError):
        FrozenCLIPEmbedder(str(clip_dir), layer="penultimate")
    with pytest.raises(ValueError):
        FrozenCLIPEmbedder(str(clip_dir), max_length=78)


def test_clip_diffusers_pipeline_folder(clip_dir, tmp_path):
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "text_encoder").mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):  # what CLIPTokenizer.save_pretrained writes (v5)
        shutil.copy(clip_dir / name, tmp_path / "tokenizer" / name)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(clip_dir / name, tmp_path / "text_encoder" / name)
    assert torch.equal(FrozenCLIPEmbedder(str(tmp_path))(["a cat"]), FrozenCLIPEmbedder(str(clip_dir))(["a cat"]))


def test_sd_v1_text_encoder_keys_equal_reference(tmp_path):
    """Full-size SD v1 text encoder (clip-vit-large-patch14) on the meta device: keys and shapes of the reference."""
    ref = json.loads((ROOT / "tests" / "reference" / "sd_v1_text_encoder_keys.json").read_text())
    _write_clip_tokenizer(tmp_path)
    transformers.CLIPTextConfig(**ref["_meta"]["text_config"]).save_pretrained(str(tmp_path))
    with torch.device("meta"):
        emb = FrozenCLIPEmbedder(str(tmp_path))
    shapes = {"cond_stage_model." + k: list(v.shape) for k, v in emb.state_dict().items()}
    assert shapes == ref["text_encoder"]
    assert sum(p.numel() for p in emb.parameters()) == ref["_meta"]["num_params"] == 123_060_480
    assert all(v.dtype == torch.float32 for v in emb.state_dict().values())
    assert {"cond_stage_model." + k for k in emb.checkpoint_only_keys} == set(ref["_meta"]["checkpoint_only"])
    assert emb.transformer.text_model.embeddings.position_ids.device.type == "meta"


def test_clip_meta_dry_run_skips_the_weights(clip_dir):
    with torch.device("meta"):
        emb = FrozenCLIPEmbedder(str(clip_dir))  # transformers' from_pretrained refuses a meta context: not called
    assert {p.device.type for p in emb.parameters()} == {"meta"}
    assert {k: v.shape for k, v in emb.state_dict().items()} == {
        k: v.shape for k, v in FrozenCLIPEmbedder(str(clip_dir)).state_dict().items()
    }


# ------------------------------------------------------------------------------------------------------ BERT / x-tf
@pytest.fixture()
def vocab_file(tmp_path) -> Path:
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(BERT_VOCAB) + "\n")
    return path


def test_bert_tokenizer_from_a_vocab_file_and_folder(vocab_file, tmp_path):
    tok = BERTTokenizer(vq_interface=False, max_length=8, vocab_path=vocab_file)
    # [CLS] a photo of cat ##s [SEP] [PAD] (lower-cased; "cats" -> "cat", "##s")
    assert tok(["A photo of cats"]).tolist() == [[2, 5, 6, 7, 8, 9, 3, 0]]
    assert tok.encode(["dog"]).tolist() == [[2, 1, 3, 0, 0, 0, 0, 0]]  # unknown word -> [UNK]
    vq = BERTTokenizer(max_length=8, vocab_path=vocab_file).encode(["a cat"])
    assert vq[0] is None and vq[1] is None and vq[2][2].tolist() == [[2, 5, 8, 3, 0, 0, 0, 0]]
    folder = tmp_path / "bert"
    tok.tokenizer.save_pretrained(str(folder))
    assert BERTTokenizer(vq_interface=False, max_length=8, vocab_path=folder)(["A photo of cats"]).tolist() == [
        [2, 5, 6, 7, 8, 9, 3, 0]
    ]


def test_bert_tokenizer_needs_a_local_vocabulary(tmp_path):
    with pytest.raises(ValueError) as err:
        BERTTokenizer()
    assert "vocab_path" in _one_line(err) and "nothing is downloaded" in str(err.value)
    with pytest.raises(FileNotFoundError) as err:
        BERTTokenizer(vocab_path=tmp_path / "nope.txt")
    _one_line(err)
    with pytest.raises(FileNotFoundError) as err:
        BERTTokenizer(vocab_path=tmp_path)  # a folder without vocab.txt / tokenizer.json
    _one_line(err)
    bad = tmp_path / "bad.txt"
    bad.write_text("a\nb\n")
    with pytest.raises(ValueError) as err:
        BERTTokenizer(vocab_path=bad)
    assert "[PAD]" in _one_line(err)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # read_text would block forever; /dev/zero would be read until memory runs out
    for special in (fifo, Path("/dev/zero")):
        with pytest.raises(ValueError) as err:
            BERTTokenizer(vocab_path=special)
        assert "is not a regular file of at most 16 MiB" in _one_line(err)


def test_bert_truncation_warns(vocab_file, caplog):
    tok = BERTTokenizer(vq_interface=False, max_length=6, vocab_path=vocab_file)
    with caplog.at_level(logging.WARNING, logger=enc.__name__):
        tokens = tok(["a photo of a photo of cats"])  # 8 word pieces + [CLS] + [SEP] = 10: 4 over
    assert tokens.tolist() == [[2, 5, 6, 7, 5, 3]]
    (record,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "4 from prompt 0" in record.getMessage()


def _expected_transformer_keys(n_layer: int) -> set[str]:
    """latent-diffusion's TransformerWrapper(Encoder) keys (CompVis/latent-diffusion ldm/modules/x_transformer.py)."""
    keys = {
        "transformer.token_emb.weight",
        "transformer.pos_emb.emb.weight",
        "transformer.norm.weight",
        "transformer.norm.bias",
        "transformer.to_logits.weight",
        "transformer.to_logits.bias",
    }
    for i in range(n_layer):
        a, f = f"transformer.attn_layers.layers.{2 * i}", f"transformer.attn_layers.layers.{2 * i + 1}"
        keys |= {
            f"{a}.0.weight",
            f"{a}.0.bias",
            f"{a}.1.to_q.weight",
            f"{a}.1.to_k.weight",
            f"{a}.1.to_v.weight",
            f"{a}.1.to_out.weight",
            f"{a}.1.to_out.bias",
        }
        keys |= {
            f"{f}.0.weight",
            f"{f}.0.bias",
            f"{f}.1.net.0.0.weight",
            f"{f}.1.net.0.0.bias",
            f"{f}.1.net.2.weight",
            f"{f}.1.net.2.bias",
        }
    return keys


def test_bert_embedder_shapes_and_compvis_keys(vocab_file):
    torch.manual_seed(0)
    emb = BERTEmbedder(n_embed=16, n_layer=2, vocab_size=len(BERT_VOCAB), max_seq_len=12, vocab_path=vocab_file, device="cuda")
    z = emb(["a photo of cats", "cat"])
    assert z.shape == (2, 12, 16) and torch.isfinite(z).all()
    assert torch.allclose(emb.encode(["cat"]), z[1:], atol=1e-6)  # padding is attended to, but rows are batch-independent
    shapes = {k: tuple(v.shape) for k, v in emb.state_dict().items()}
    assert set(shapes) == _expected_transformer_keys(2)
    # as in latent-diffusion, attention is 8 heads x 64 wide whatever n_embed
    assert shapes["transformer.attn_layers.layers.0.1.to_q.weight"] == (512, 16)
    assert shapes["transformer.attn_layers.layers.0.1.to_out.weight"] == (16, 512)
    assert shapes["transformer.attn_layers.layers.1.1.net.0.0.weight"] == (64, 16)
    assert shapes["transformer.pos_emb.emb.weight"] == (12, 16)
    assert shapes["transformer.to_logits.weight"] == (len(BERT_VOCAB), 16)
    tokens_only = BERTEmbedder(n_embed=16, n_layer=2, vocab_size=len(BERT_VOCAB), max_seq_len=12, use_tokenizer=False)
    assert not hasattr(tokens_only, "tknz_fn")
    tokens_only.load_state_dict(emb.state_dict(), strict=True)
    assert torch.allclose(tokens_only(emb.tknz_fn(["cat"])), z[1:], atol=1e-6)
    with pytest.raises(ValueError) as err:
        BERTEmbedder(n_embed=16, n_layer=1, vocab_size=5, vocab_path=vocab_file)
    assert "vocab_size=5" in _one_line(err)


def test_txt2img_f8_bert_embedder_keys_on_meta(vocab_file):
    """configs/latent-diffusion/txt2img-1p4B-eval.yaml: BERTEmbedder(n_embed=1280, n_layer=32)."""
    with torch.device("meta"):
        emb = BERTEmbedder(n_embed=1280, n_layer=32, vocab_path=vocab_file)
    shapes = {k: tuple(v.shape) for k, v in emb.state_dict().items()}
    assert set(shapes) == _expected_transformer_keys(32) and len(shapes) == 6 + 32 * 13
    assert shapes["transformer.token_emb.weight"] == (30522, 1280)
    assert shapes["transformer.pos_emb.emb.weight"] == (77, 1280)
    assert shapes["transformer.attn_layers.layers.63.1.net.2.weight"] == (1280, 5120)


def _reference_forward(sd: dict[str, torch.Tensor], tokens: torch.Tensor, n_layer: int, heads: int = 8) -> torch.Tensor:
    """latent-diffusion's TransformerWrapper(..., return_embeddings=True) in float64, from its einsum formulation."""
    sd = {k: v.double() for k, v in sd.items()}

    def ln(x, p):
        return torch.nn.functional.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], 1e-5)

    x = sd["transformer.token_emb.weight"][tokens] + sd["transformer.pos_emb.emb.weight"][: tokens.shape[1]][None]
    for i in range(n_layer):
        a, f = f"transformer.attn_layers.layers.{2 * i}", f"transformer.attn_layers.layers.{2 * i + 1}"
        h = ln(x, a + ".0")
        q, k, v = (torch.einsum("bnd,ed->bne", h, sd[f"{a}.1.to_{n}.weight"]) for n in "qkv")
        q, k, v = (t.reshape(t.shape[0], t.shape[1], heads, -1).permute(0, 2, 1, 3) for t in (q, k, v))
        dots = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(q.shape[-1])
        out = torch.einsum("bhij,bhjd->bhid", dots.softmax(-1), v).permute(0, 2, 1, 3).flatten(2)
        x = x + out @ sd[f"{a}.1.to_out.weight"].T + sd[f"{a}.1.to_out.bias"]
        h = ln(x, f + ".0") @ sd[f"{f}.1.net.0.0.weight"].T + sd[f"{f}.1.net.0.0.bias"]
        h = torch.nn.functional.gelu(h)
        x = x + h @ sd[f"{f}.1.net.2.weight"].T + sd[f"{f}.1.net.2.bias"]
    return ln(x, "transformer.norm")


def test_transformer_embedder_matches_a_float64_reference():
    torch.manual_seed(0)
    emb = TransformerEmbedder(n_embed=24, n_layer=2, vocab_size=50, max_seq_len=10).double().eval()
    for p in emb.parameters():  # non-trivial LayerNorm affine parameters and biases
        p.data.normal_(0, 0.3, generator=torch.Generator().manual_seed(p.numel()))
    tokens = torch.randint(0, 50, (3, 10), generator=torch.Generator().manual_seed(1))
    z = emb(tokens)
    assert z.shape == (3, 10, 24) and z.dtype == torch.float64
    expected = _reference_forward(emb.state_dict(), tokens, n_layer=2)
    assert torch.allclose(z, expected, atol=1e-10, rtol=0)
    assert set(emb.state_dict()) == _expected_transformer_keys(2)
    assert emb(tokens[:, :4]).shape == (3, 4, 24)  # shorter sequences use the first positions
    logits = emb.transformer(tokens)
    assert logits.shape == (3, 10, 50)


def test_transformer_embedder_rejects_bad_tokens():
    emb = TransformerEmbedder(n_embed=8, n_layer=1, vocab_size=20, max_seq_len=6)
    with pytest.raises(ValueError) as err:
        emb(torch.tensor([[0, 20]]))
    assert "[0, 20)" in _one_line(err)
    with pytest.raises(ValueError):
        emb(torch.zeros(1, 3))
    with pytest.raises(ValueError):
        emb(torch.zeros(1, 7, dtype=torch.long))  # longer than max_seq_len
    with pytest.raises(ValueError):
        xt.Encoder(dim=8, depth=0)


def test_x_transformer_mask_ignores_padding_keys():
    torch.manual_seed(0)
    wrapper = xt.TransformerWrapper(num_tokens=20, max_seq_len=8, attn_layers=xt.Encoder(dim=16, depth=2))
    tokens = torch.tensor([[3, 4, 5, 0, 0, 0]])
    mask = torch.tensor([[True, True, True, False, False, False]])
    masked = wrapper(tokens, return_embeddings=True, mask=mask)
    alone = wrapper(tokens[:, :3], return_embeddings=True)
    assert torch.allclose(masked[:, :3], alone, atol=1e-6)


# ------------------------------------------------------------------------------------------------------- packaging
def test_no_cuda_calls_and_no_hard_coded_device():
    for module in (enc, xt):
        source = inspect.getsource(module)
        assert not re.search(r"\.cuda\(", source), module.__name__
        assert not re.search(r"device\s*=\s*[\"']cuda", source), module.__name__


def test_import_without_transformers_and_one_line_hint(clip_dir, vocab_file, monkeypatch):
    code = (
        "import sys; sys.modules['transformers'] = None; import ldm.modules.encoders.modules as m; "
        "print(m.ClassEmbedder.__name__, 'transformers' in sys.modules and sys.modules['transformers'] is not None)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.split() == ["ClassEmbedder", "False"], out.stderr
    monkeypatch.setitem(sys.modules, "transformers", None)  # an import of it now raises ImportError
    for build in (lambda: FrozenCLIPEmbedder(str(clip_dir)), lambda: BERTTokenizer(vocab_path=vocab_file)):
        with pytest.raises(ImportError) as err:
            build()
        assert "pip install -e .[text]" in _one_line(err)


def test_a_clip_folder_whose_config_is_not_a_bounded_clip_text_config_is_one_line(clip_dir, tmp_path):
    for name, config in (("unet_config", {"_class_name": "UNet2DConditionModel", "model_type": "unet"}),
                         ("huge", {"model_type": "clip_text_model", "num_hidden_layers": 5000}),
                         ("not_json", None)):  # fmt: skip
        folder = tmp_path / name
        shutil.copytree(clip_dir, folder)
        (folder / "config.json").write_text("{not json" if config is None else json.dumps(config))
        with pytest.raises(ValueError) as err:
            FrozenCLIPEmbedder(str(folder))
        msg = _one_line(err)
        assert str(folder) in msg and "config.json" in msg, msg


def test_an_encoder_written_for_compvis_may_set_its_own_device():
    """CompVis and SD encoders assign ``self.device`` in ``__init__``: AbstractEncoder must not own that name."""

    class OwnDevice(AbstractEncoder):
        def __init__(self, device: str = "cpu") -> None:
            super().__init__()
            self.device = device

        def encode(self, text):
            return torch.zeros(len(text), 1, 4, device=self.device)

    encoder = OwnDevice()
    assert encoder.device == "cpu" and encoder.encode(["a", "b"]).shape == (2, 1, 4)
