"""Checkpoint files: written with a sha256 sidecar, verified when read, loaded with weights_only=True.

No Ray here: the worker loop, the driver, the ensemble and the benchmarks all read and write the same
`checkpoint.pt`. Where a checkpoint lives (a Ray Train checkpoint folder, an MLflow artifact, a file the
user gave) is the caller's business; `where` names it in errors.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

CHECKPOINT_FILE = "checkpoint.pt"
CHECKSUM_FILE = "checkpoint.pt.sha256"  # beside every checkpoint: what was written is what is read back


class CheckpointIntegrityError(RuntimeError):
    """A checkpoint whose bytes differ from the checksum written with it."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(state: dict, folder: Path) -> None:
    torch.save(state, folder / CHECKPOINT_FILE)
    (folder / CHECKSUM_FILE).write_text(sha256_file(folder / CHECKPOINT_FILE) + "\n")


def checkpoint_url(ckpt) -> str:
    """Where a Ray checkpoint is stored, as the user wrote it (s3://bucket/..., or a folder)."""
    fs = getattr(ckpt, "filesystem", None)
    return f"s3://{ckpt.path}" if getattr(fs, "type_name", "") == "s3" else str(ckpt.path)


def load_checkpoint(path: Path, where: str) -> dict:
    """A checkpoint file, verified against its sha256 sidecar, loaded with weights_only=True.

    `where` names the stored object (e.g. s3://bucket/runs/NAME/epoch_0003/checkpoint.pt) in the error."""
    path = Path(path)
    sidecar = path.with_name(CHECKSUM_FILE)
    if sidecar.exists():
        want, got = sidecar.read_text().split()[0], sha256_file(path)
        if want != got:
            raise CheckpointIntegrityError(
                f"checkpoint {where} is corrupt: its sha256 is {got[:12]}..., {CHECKSUM_FILE} says {want[:12]}... "
                f"({path.stat().st_size} bytes). Likely causes: an S3-compatible store that kept aws-chunked "
                "framing inside the object (set AWS_REQUEST_CHECKSUM_CALCULATION=when_required), or the object "
                "was overwritten. Delete that checkpoint folder to resume from an earlier one."
            )
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file
        raise CheckpointIntegrityError(f"checkpoint {where} cannot be loaded: {str(e).splitlines()[0]}") from None
