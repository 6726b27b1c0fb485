#!/usr/bin/env python3
"""Writes the CLIP towers of a trainer checkpoint as a weights file that
`model.clip_weights` (or `handid-trainer train --clip-weights`) loads: every
tensor of the checkpoint's `model.safetensors` but the modules the trainer
adds to CLIP (`head.*`, `prompt_learner.*`, `promptsg.*`), which strict
loading would refuse as unused. The names are OpenAI's already.

    clip_towers.py RUN/checkpoints/best/model.safetensors OUT.safetensors

Used by scripts/experiments/upgrade.sh (START=pretrained). Standard library
only: the safetensors layout is an 8-byte little-endian header length, a
JSON header naming each tensor's dtype, shape and byte range, then the
bytes.
"""

import json
import struct
import sys

TRAINER_MODULES = ("head", "prompt_learner", "promptsg")


def main(source: str, target: str) -> None:
    with open(source, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        data = f.read()
    kept, chunks, offset = {}, [], 0
    for name in sorted(header):
        info = header[name]
        if name == "__metadata__" or name.split(".")[0] in TRAINER_MODULES:
            continue
        start, end = info["data_offsets"]
        chunks.append(data[start:end])
        kept[name] = {"dtype": info["dtype"], "shape": info["shape"], "data_offsets": [offset, offset + end - start]}
        offset += end - start
    if not kept:
        sys.exit(f"{source}: no CLIP tensor in it")
    raw = json.dumps(kept, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(target, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for chunk in chunks:
            f.write(chunk)
    print(f"{target}: {len(kept)} CLIP tensors of {source}", file=sys.stderr)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
