"""Recipe sections of the multimodal recipe (tasks/multimodal/): small image and audio encoders
pretrained as classifiers then frozen, and a contrastive aligner over them (phase 1), trained
as stages of the one loop. Schema rules as in config.py, which re-exports these."""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from stoker.config import ModelConfig, PositiveFloat, PositiveInt, RecipeConfig, Section, Seed
from stoker.config_finetune import LoRAConfig

MODALITIES = ("image", "audio")


class ModalityEncoderConfig(Section):
    """One modality's encoder (models/multimodal.py `ENCODERS`), pretrained on its labelled
    files for `pretrain_steps` at `lr`, then frozen."""

    # image_cnn / audio_cnn: built and pretrained here; hf_clip / hf_siglip (image) and
    # hf_whisper (audio): a local Hugging Face directory (`path`), pretrained, frozen as is
    kind: Literal["image_cnn", "audio_cnn", "hf_clip", "hf_siglip", "hf_whisper"]
    path: str | None = None  # the hf_* kinds' directory
    widths: list[PositiveInt] = [16, 32, 64]  # channels of each conv block
    n_mels: PositiveInt = 40  # audio: log-mel bands
    n_fft: PositiveInt = 512  # audio: STFT window (samples)
    hop_length: PositiveInt = 256  # audio: STFT hop (samples)
    pretrain_steps: PositiveInt = 200
    lr: PositiveFloat = 3e-3

    @model_validator(mode="after")
    def _check(self) -> ModalityEncoderConfig:
        if not self.widths:
            raise ValueError("widths must name at least one conv block's channels")
        if self.pretrained and not self.path:
            raise ValueError(f"kind {self.kind} needs path: a local Hugging Face directory")
        return self

    @property
    def pretrained(self) -> bool:
        """A frozen pretrained encoder (no encoder stage trains it)."""
        return self.kind.startswith("hf_")


class MultimodalDataConfig(Section):
    """The files (`scripts/multimodal_data.py DIR` writes the digits task): labelled images
    and clips for the encoders, alignment pairs for phase 1 (paths relative to each file)."""

    dir: str = "data/digits"
    images: str = "images.jsonl"  # {"path", "label", "split"}
    audio: str = "audio.jsonl"  # {"path", "label", "split"}
    align_train: str = "align-train.jsonl"  # {"image", "audio", "label"}
    align_test: str = "align-test.jsonl"
    chat_train: str = "chat-train.jsonl"  # {"messages", "image"?, "audio"?} (phase 2)
    chat_test: str = "chat-test.jsonl"
    n_classes: PositiveInt = 10  # the encoders' pretraining labels
    sample_rate: PositiveInt = 22050  # audio is checked against this (no resampling)
    audio_seconds: PositiveFloat = 1.0  # clips cropped/padded to this length
    seed: Seed = 1234
    eval_examples: PositiveInt = 400  # held-out items per evaluation
    num_workers: int | Literal["auto"] = 0  # the loop's loader (batches are built in memory)
    pin_memory: bool | Literal["auto"] = "auto"
    prefetch_factor: PositiveInt = 2


class AlignerConfig(Section):
    dim: PositiveInt = 64  # the shared embedding size
    max_steps: PositiveInt = 300
    lr: PositiveFloat = 2e-3
    eval_interval: PositiveInt = 100


class LMConfig(Section):
    """The language model: a small decoder (models/gpt.py) pretrained here on the described
    conversations (tasks/multimodal/chat.py `describe`), vocabulary = the words of the data."""

    model: ModelConfig = ModelConfig(n_layer=2, n_head=4, d_model=128, max_seq_len=64)
    pretrain_steps: PositiveInt = 300
    lr: PositiveFloat = 3e-3
    # a pretrained decoder (local HF dir or stoker checkpoint) with its tokenizer and chat
    # template: no `lm` stage; phase 2 adapts it (tasks/multimodal/hf_chat.py)
    init_from: str | None = None
    image_token: str = "<image>"  # with init_from: single tokens of its tokenizer that mark
    audio_token: str = "<audio>"  # the slots (e.g. Qwen2's <|image_pad|>, <|video_pad|>)


class Phase2Config(Section):
    """Projectors + missing embeddings (at `lr`) and LoRA on the LM (at `lr · lora_lr_scale`)
    on the conversations; aligner and encoders frozen."""

    n_tokens: PositiveInt = 4  # soft tokens per modality (features: pooled)
    # pooled: each modality's aligned embedding -> n_tokens tokens (the projector's output
    # holds them all); sequence: the encoder's patches / frames, one token each
    features: Literal["pooled", "sequence"] = "pooled"
    projector_hidden: PositiveInt | None = None  # the projectors' middle width; None: LM hidden
    max_steps: PositiveInt = 300
    lr: PositiveFloat = 3e-3
    lora_lr_scale: PositiveFloat = 0.1  # projectors learn from scratch, LoRA adapts
    eval_interval: PositiveInt = 100
    max_new_tokens: PositiveInt = 4  # greedy answer length limit
    pad: Literal["longest", "max"] = "longest"  # dynamic padding, or to lm.model.max_seq_len


class MultimodalConfig(Section):
    image: ModalityEncoderConfig | None = ModalityEncoderConfig(kind="image_cnn")
    audio: ModalityEncoderConfig | None = ModalityEncoderConfig(kind="audio_cnn", widths=[16, 32])
    aligner: AlignerConfig = AlignerConfig()
    lm: LMConfig = LMConfig()
    phase2: Phase2Config = Phase2Config()
    phases: list[Literal[1, 2]] = [1, 2]
    # the stage one `stoker train` runs (set by the recipe itself for each stage's run):
    # None = all of them in order; encoder:image, encoder:audio, phase1, lm, phase2
    stage: str | None = None

    @property
    def modalities(self) -> list[str]:
        return [m for m in MODALITIES if getattr(self, m) is not None]

    @property
    def trained_encoders(self) -> list[str]:
        """The modalities whose encoder an `encoder:<modality>` stage pretrains here."""
        return [m for m in self.modalities if not self.encoder(m).pretrained]

    def encoder(self, modality: str) -> ModalityEncoderConfig:
        enc = getattr(self, modality)
        assert enc is not None
        return enc

    @model_validator(mode="after")
    def _check(self) -> MultimodalConfig:
        if len(self.modalities) < 2:
            raise ValueError("multimodal needs two modalities (image and audio) to align")
        kinds = {
            "image": ("image_cnn", "hf_clip", "hf_siglip"),
            "audio": ("audio_cnn", "hf_whisper"),
        }
        for m in self.modalities:
            if self.encoder(m).kind not in kinds[m]:
                raise ValueError(f"multimodal.{m}.kind={self.encoder(m).kind} encodes another "
                                 f"modality; use one of {', '.join(kinds[m])}")  # fmt: skip
        if sorted(set(self.phases)) != self.phases:
            raise ValueError(f"multimodal.phases must be increasing and unique, got {self.phases}")
        valid = {f"encoder:{m}" for m in self.trained_encoders} | {"phase1", "lm", "phase2", None}
        if self.stage not in valid:
            raise ValueError(f"multimodal.stage={self.stage} is not a stage of this recipe; use "
                             f"one of {', '.join(sorted(s for s in valid if s))}")  # fmt: skip
        return self


class MultimodalRecipeConfig(RecipeConfig):
    """Frozen image/audio encoders and the contrastive aligner over them; `train.*` are the
    loop's settings shared by every stage, each stage has its own steps and LR."""

    recipe: Literal["multimodal"] = "multimodal"  # type: ignore[assignment]
    data: MultimodalDataConfig = MultimodalDataConfig()  # type: ignore[assignment]
    lora: LoRAConfig = LoRAConfig(targets=["q_proj", "k_proj", "v_proj", "o_proj"])
    multimodal: MultimodalConfig = MultimodalConfig()


__all__ = [
    "AlignerConfig",
    "LMConfig",
    "Phase2Config",
    "ModalityEncoderConfig",
    "MultimodalConfig",
    "MultimodalDataConfig",
    "MultimodalRecipeConfig",
]
