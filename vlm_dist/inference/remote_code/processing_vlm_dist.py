"""The processor of a vlm_dist model exported for transformers (custom code).

    processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")

SigLIP's image processor and the Qwen3 tokenizer, with the chat template the model was trained
with. The template writes each image as `<|vision_start|><|image_pad|><|vision_end|>`; the
processor repeats `<|image_pad|>` to the connector's fixed `num_image_tokens` per image, so the
token ids are those vlm_dist trained on.

Images given as a path, an http(s) URL or base64 are decoded as vlm_dist's feature cache decoded
them (vlm_dist.contract.images.load_image): a JPEG at least twice `jpeg_draft_to` on both sides is
decoded at reduced scale by the JPEG decoder (PIL's draft), then EXIF-rotated upright and converted
to 8-bit RGB with transparency composited on white. A PIL image passed in is only converted to RGB
that way: decode it like this (`decode_image`) for the training-time pixels of a large JPEG.
"""
import base64
import os
from io import BytesIO

import numpy as np
from PIL import Image, ImageOps
from transformers.models.llava.processing_llava import LlavaProcessor
from transformers.processing_utils import MultiModalData

URL_TIMEOUT_S = 30


def open_image(source: str) -> Image.Image:
    """A path, http(s) URL, data: URL or base64 string -> an undecoded PIL image."""
    if source.startswith(("http://", "https://")):
        from huggingface_hub.utils import httpx
        return Image.open(BytesIO(httpx.get(source, timeout=URL_TIMEOUT_S, follow_redirects=True).content))
    if os.path.isfile(source):
        return Image.open(source)
    data = source.split(",", 1)[1] if source.startswith("data:") else source
    return Image.open(BytesIO(base64.b64decode(data)))


def decode_image(source, draft_to=None) -> Image.Image:
    """An upright 8-bit RGB image, decoded as vlm_dist's cache decoded its images."""
    img = open_image(source) if isinstance(source, str) else source
    w, h = img.size
    if draft_to and getattr(img, "format", None) == "JPEG" and min(w, h) >= 2 * draft_to:
        img.draft(None, (draft_to, draft_to))   # keeps both sides >= draft_to; no-op once decoded
    img.load()
    return to_rgb(ImageOps.exif_transpose(img))


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB (alpha composited on white; 16-bit and float greyscale scaled).

    A copy of vlm_dist.contract.images.to_rgb (this file runs inside exports, without vlm_dist);
    tests/test_export_remote.py checks the decoded pixels equal tower.decode's."""
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img)
        if arr.dtype.kind == "f":
            scale = 255.0 if float(np.nanmax(arr, initial=0.0)) <= 1.0 else 1.0
            out = np.nan_to_num(arr.astype(np.float64)) * scale
        else:
            sixteen_bit = img.mode.startswith("I;16") or int(arr.max(initial=0)) > 255
            out = arr.astype(np.float64) / (257.0 if sixteen_bit else 1.0)
        img = Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode == "1":
        img = img.convert("L")
    return img.convert("RGB")


class VlmDistProcessor(LlavaProcessor):
    def __init__(self, image_processor=None, tokenizer=None, num_image_tokens=None, jpeg_draft_to=None,
                 chat_template=None, **kwargs):
        if num_image_tokens is None:
            raise ValueError("VlmDistProcessor needs num_image_tokens (the connector's tokens per image)")
        self.num_image_tokens = int(num_image_tokens)
        self.jpeg_draft_to = jpeg_draft_to
        super().__init__(image_processor, tokenizer, chat_template=chat_template, image_token="<|image_pad|>",
                         **kwargs)

    def prepare_inputs_layout(self, images=None, text=None, videos=None, audio=None, **kwargs):
        if images is not None:
            images = self._decode(images)
        return super().prepare_inputs_layout(images=images, text=text, videos=videos, audio=audio, **kwargs)

    def _decode(self, images):
        if isinstance(images, (list, tuple)):
            return [self._decode(x) for x in images]
        if isinstance(images, (str, Image.Image)):
            return decode_image(images, self.jpeg_draft_to)
        return images   # arrays and tensors: already pixels

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        return self.image_token * self.num_image_tokens

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs):
        if image_sizes is None:
            return MultiModalData()
        return MultiModalData(num_image_tokens=[self.num_image_tokens] * len(image_sizes),
                              num_image_patches=[1] * len(image_sizes))


__all__ = ["VlmDistProcessor", "decode_image"]
