"""Prompt Schedule node: prompts on a timeline, encoded once each."""

from __future__ import annotations

from ..causvid_core.pipeline import EncodedSchedule, encode_schedule
from ..causvid_core.schedule import UNITS, ScheduleEntry


def _clip_encoder(clip):
    def encode(prompt: str):
        tokens = clip.tokenize(prompt)
        return clip.encode_from_tokens_scheduled(tokens)[0][0]  # [1, L, dim]

    return encode


class CausVidPromptSchedule:
    DESCRIPTION = (
        "Prompts on a timeline, one change per line: '0: a red circle moving right' then '4: a blue square "
        "moving left', keyed by chunk, second (also '0:10' timestamps) or frame. Changes happen at chunk "
        "boundaries, optionally blended over N chunks. Encoded with a ComfyUI CLIP (Wan's umT5) or the "
        "embedded model's own text encoder; a plain CONDITIONING can be used instead of text."
    )
    CATEGORY = "CausVid/prompts"
    RETURN_TYPES = ("CAUSVID_PROMPTS",)
    RETURN_NAMES = ("prompts",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "schedule": ("STRING", {"multiline": True, "default": "0: a red circle moving right",
                                        "tooltip": "TIME: prompt per line; # starts a comment"}),
                "unit": (list(UNITS), {"default": "chunk", "tooltip": "what the times count"}),
                "blend_chunks": ("INT", {"default": 0, "min": 0, "max": 16,
                                         "tooltip": "chunks over which each change fades in"}),
            },
            "optional": {
                "clip": ("CLIP", {"tooltip": "Wan's umT5 text encoder, for Wan/CausVid models"}),
                "model": ("CAUSVID_MODEL", {"tooltip": "embedded models encode with their own text encoder"}),
                "conditioning": ("CONDITIONING", {"tooltip": "use this instead of the schedule text"}),
            },
        }  # fmt: skip

    def build(self, schedule, unit, blend_chunks, clip=None, model=None, conditioning=None):
        if conditioning is not None:
            entry = ScheduleEntry(0, "<conditioning>", 1)
            return (EncodedSchedule([entry], [conditioning[0][0]], unit, blend_chunks),)
        if clip is not None:
            encode = _clip_encoder(clip)
        elif model is not None and model.text_encoder is not None:
            encode = lambda prompt: model.text_encoder.encode([prompt])  # noqa: E731
        else:
            raise ValueError(
                "Prompt Schedule needs a text encoder: connect a CLIP (Wan umT5) for Wan/CausVid models, the "
                "CausVid model for embedded models, or a CONDITIONING"
            )
        return (encode_schedule(schedule, unit, encode, blend_chunks),)


NODE_CLASS_MAPPINGS = {"CausVid_PromptSchedule": CausVidPromptSchedule}
NODE_DISPLAY_NAME_MAPPINGS = {"CausVid_PromptSchedule": "Prompt Schedule (CausVid)"}
