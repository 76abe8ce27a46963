"""Typed settings that round-trip through JSON (plans sections, checkpoints, buffer files)."""

from __future__ import annotations

from dataclasses import asdict, fields

from nnunetv2_medseqft.errors import MedSeqFTError


class JsonSettings:
    """Mixin for frozen dataclasses: ``to_dict`` / ``from_dict`` that refuses unknown keys (typos)."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise MedSeqFTError(f"Unknown {cls.__name__} keys {sorted(unknown)}; known: {sorted(known)}.")
        return cls(**d)
