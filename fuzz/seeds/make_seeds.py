"""Seeds of the two fuzz targets: small synthetic images and request
messages, written to fuzz/corpus/image/ and fuzz/corpus/requests/, and the
crafted inputs of findings, written to fuzz/regressions/image/.

Image names say what a server with default settings must do with them
(`ok-`: accepted; `refuse-`: refused as INVALID_ARGUMENT), which
server/tests/fuzz_regressions.rs checks. Every image is generated here
(gradients and noise, 64 to 512 pixels a side, a few KB): no photo of a
hand, nothing from a dataset. Needs Pillow (any 10.x or later); re-run:

    python3 -m venv /tmp/seeds && /tmp/seeds/bin/pip install pillow
    /tmp/seeds/bin/python fuzz/seeds/make_seeds.py
"""
import io
import random
import struct
import zlib
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1] / "corpus"
IMAGES = ROOT / "image"
REQUESTS = ROOT / "requests"


def picture(width: int, height: int, seed: int = 0, mode: str = "RGB", noise: int = 10) -> Image.Image:
    """A gradient with a bright disc and a little noise: every codec has
    edges, smooth areas and detail to encode."""
    rng = random.Random(seed)
    img = Image.new("RGB", (width, height))
    px = img.load()
    for y in range(height):
        for x in range(width):
            inside = (x - width / 2) ** 2 + (y - height / 3) ** 2 < (min(width, height) / 4) ** 2
            base = (250, 240, 30) if inside else (255 * x // width, 255 * y // height, (x + y) * 8 % 256)
            px[x, y] = tuple(max(0, min(255, c + rng.randint(-noise, noise))) for c in base)
    return img.convert(mode)


def encoded(img: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **options)
    return out.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int, rows: int) -> bytes:
    """An 8-bit RGB PNG whose header says `width` x `height` but whose
    data holds `rows` rows of zeros: a crafted header, a few hundred bytes."""
    raw = bytes(rows * (1 + 3 * width))
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + png_chunk(b"IDAT", zlib.compress(raw, 9))
        + png_chunk(b"IEND", b"")
    )


def jpeg_with_size(jpeg: bytes, width: int, height: int) -> bytes:
    """`jpeg` with the sides in its SOF segment replaced."""
    out = bytearray(jpeg)
    i = 2
    while i < len(out):
        marker, length = out[i + 1], struct.unpack(">H", out[i + 2 : i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            out[i + 5 : i + 9] = struct.pack(">HH", height, width)
            return bytes(out)
        i += 2 + length
    raise ValueError("no SOF")


def jpeg_with_orientation(jpeg: bytes, orientation: int) -> bytes:
    """`jpeg` with an EXIF block whose only tag is Orientation."""
    tiff = b"II*\x00" + struct.pack("<IHHHI", 8, 1, 0x0112, 3, 1) + struct.pack("<HHI", orientation, 0, 0)
    app1 = b"Exif\x00\x00" + tiff
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + jpeg[2:]


def bmp_with_size(bmp: bytes, width: int, height: int) -> bytes:
    out = bytearray(bmp)
    out[18:26] = struct.pack("<ii", width, height)
    return bytes(out)


def images() -> dict[str, bytes]:
    rgb = picture(96, 64, 1)
    tall = picture(64, 96, 2)
    jpeg = encoded(rgb, "JPEG", quality=80)
    bmp = encoded(picture(64, 64, 3), "BMP")
    return {
        # Accepted: every format, layout and bit depth the server decodes.
        "ok-png-rgb-96x64.png": encoded(rgb, "PNG"),
        "ok-png-grey-64x80.png": encoded(picture(64, 80, 4, "L"), "PNG"),
        "ok-png-grey-alpha-64x64.png": encoded(picture(64, 64, 5, "LA"), "PNG"),
        "ok-png-rgba-64x64.png": encoded(picture(64, 64, 6, "RGBA"), "PNG"),
        "ok-png-palette-72x64.png": encoded(picture(72, 64, 7).quantize(16), "PNG"),
        "ok-png-16bit-grey-64x64.png": encoded(picture(64, 64, 8, "I;16"), "PNG"),
        "ok-png-interlaced-64x72.png": encoded(picture(64, 72, 9), "PNG", interlace=1),
        "ok-png-8to1-512x64.png": encoded(picture(512, 64, 10, noise=0), "PNG", optimize=True),
        "ok-png-1to8-64x512.png": encoded(picture(64, 512, 11, noise=0), "PNG", optimize=True),
        "ok-jpeg-baseline-96x64.jpg": jpeg,
        "ok-jpeg-progressive-64x96.jpg": encoded(tall, "JPEG", quality=70, progressive=True),
        "ok-jpeg-grey-64x64.jpg": encoded(picture(64, 64, 12, "L"), "JPEG"),
        "ok-jpeg-cmyk-64x64.jpg": encoded(picture(64, 64, 13, "CMYK"), "JPEG"),
        "ok-jpeg-444-64x64.jpg": encoded(picture(64, 64, 14), "JPEG", subsampling=0),
        "ok-jpeg-restart-64x64.jpg": encoded(picture(64, 64, 15), "JPEG", restart_marker_blocks=1),
        "ok-jpeg-exif-rotated-96x64.jpg": jpeg_with_orientation(jpeg, 6),
        "ok-bmp-24bit-64x64.bmp": bmp,
        "ok-bmp-8bit-palette-64x64.bmp": encoded(picture(64, 64, 16).quantize(256), "BMP"),
        "ok-bmp-top-down-64x64.bmp": bmp_with_size(bmp, 64, -64),
        "ok-ppm-64x64.ppm": encoded(picture(64, 64, 17), "PPM"),
        # The PGM inputs (binary and ASCII) are built in memory by
        # server/tests/fuzz_regressions.rs rather than committed as files.
        "ok-pbm-64x64.pbm": encoded(picture(64, 64, 19, "1"), "PPM"),
        "ok-pam-rgb-64x64.pam": b"P7\nWIDTH 64\nHEIGHT 64\nDEPTH 3\nMAXVAL 255\nTUPLTYPE RGB\nENDHDR\n"
        + picture(64, 64, 20).tobytes(),
        # Refused: formats the server does not decode.
        "refuse-webp-64x64.webp": encoded(picture(64, 64, 21), "WEBP", quality=50),
        "refuse-gif-64x64.gif": encoded(picture(64, 64, 22).quantize(16), "GIF"),
        "refuse-tiff-64x64.tif": encoded(picture(64, 64, 23), "TIFF"),
        "refuse-text.txt": b"definitely not an image\n",
        "refuse-empty": b"",
        # Refused from the header: too small, too long, too elongated, too many pixels.
        "refuse-png-1x1.png": encoded(picture(1, 1), "PNG"),
        "refuse-png-too-small-63x200.png": encoded(picture(63, 200, 24, noise=0), "PNG"),
        "refuse-png-side-30000000x1.png": png_declaring(30_000_000, 1, 0),
        "refuse-png-side-1x30000000.png": png_declaring(1, 30_000_000, 1),
        "refuse-png-aspect-10000x1000.png": png_declaring(10_000, 1_000, 1),
        "refuse-png-pixels-7000x7000.png": png_declaring(7_000, 7_000, 1),
        "refuse-png-zero-width.png": png_declaring(0, 64, 0),
        "refuse-jpeg-side-65500x65500.jpg": jpeg_with_size(jpeg, 65_500, 65_500),
        "refuse-jpeg-aspect-64x4000.jpg": jpeg_with_size(jpeg, 64, 4_000),
        "refuse-bmp-side-60000x60000.bmp": bmp_with_size(bmp, 60_000, 60_000),
        "refuse-bmp-negative-width.bmp": bmp_with_size(bmp, -64, 64),
        "refuse-ppm-side-100000x100000.ppm": b"P6\n100000 100000\n255\n" + bytes(64),
        # Refused after the header: the data is not what it declared.
        "refuse-png-declares-4000x4000-has-one-row.png": png_declaring(4_000, 4_000, 1),
        "refuse-jpeg-truncated.jpg": jpeg[: len(jpeg) // 2],
        "refuse-png-truncated.png": encoded(rgb, "PNG")[:300],
        "refuse-ppm-short-data.ppm": b"P6\n2000 2000\n255\n" + bytes(100),
    }


def image_regressions() -> dict[str, bytes]:
    """Inputs of findings, kept after their fix (fuzz/regressions/image/)."""
    jpeg = encoded(picture(96, 64, 1), "JPEG", quality=80)
    progressive = encoded(picture(64, 96, 2), "JPEG", quality=70, progressive=True)
    return {
        # 96x64 pixels of scan data in a frame that declares 4000x3000 was
        # decoded to 12 megapixels of grey and embedded (now refused from
        # the scan sizes, before decoding).
        "refuse-jpeg-declares-4000x3000.jpg": jpeg_with_size(jpeg, 4_000, 3_000),
        "refuse-jpeg-progressive-declares-3000x4000.jpg": jpeg_with_size(progressive, 3_000, 4_000),
        # The PNM decoder quoted a PAM header's unknown line, or its tuple
        # type, whole in its error message (now elided and cut).
        "refuse-pam-unknown-header-line-3000-chars.pam": b"P7\n" + b"X" * 3000 + b" 1\nENDHDR\n",
        "refuse-pam-tuple-type-3000-chars-with-escape.pam": b"P7\nWIDTH 64\nHEIGHT 64\nDEPTH 3\nMAXVAL 255\n"
        + b"TUPLTYPE Q\x1b[2J"
        + b"Q" * 3000
        + b"\nENDHDR\n"
        + bytes(64 * 64 * 3),
    }


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field(number: int, value) -> bytes:
    """A protobuf field: bytes/str (length-delimited), int (varint),
    ("f32", x) / ("f64", x) (fixed)."""
    if isinstance(value, str):
        value = value.encode()
    if isinstance(value, bytes):
        return varint(number << 3 | 2) + varint(len(value)) + value
    if isinstance(value, int):
        return varint(number << 3) + varint(value % (1 << 64))
    kind, x = value
    if kind == "f32":
        return varint(number << 3 | 5) + struct.pack("<f", x)
    return varint(number << 3 | 1) + struct.pack("<d", x)


def image_message(data: bytes) -> bytes:
    return field(1, data)


def requests() -> dict[str, bytes]:
    png = images()["ok-png-rgb-96x64.png"][:64]
    threshold = lambda t: field(4, field(1, ("f32", t)))  # noqa: E731
    fmr = lambda f: field(4, field(2, ("f64", f)))  # noqa: E731
    return {
        "enroll.pb": field(1, "lobby") + field(2, "subject-1") + field(3, image_message(png)) + field(4, "key-1"),
        "enroll-two-images.pb": field(1, "g") + field(2, "s") + field(3, image_message(b"a")) * 2,
        "enroll-17-images.pb": field(1, "g") + field(2, "s") + field(3, image_message(b"x")) * 17,
        "enroll-nul-in-gallery.pb": field(1, "lob\0by") + field(2, "s") + field(3, image_message(b"x")),
        "enroll-escape-in-key.pb": field(1, "g") + field(2, "s") + field(3, image_message(b"x")) + field(4, "k\x1b[31m"),
        "enroll-long-key.pb": field(1, "g") + field(2, "s") + field(3, image_message(b"x")) + field(4, "\u00e9" * 257),
        "enroll-bad-id-chars.pb": field(1, "g/../etc") + field(2, "s s") + field(3, image_message(b"x")),
        "enroll-129-char-id.pb": field(1, "g" * 129) + field(2, "s") + field(3, image_message(b"x")),
        "identify-threshold.pb": field(1, "lobby") + field(2, image_message(png)) + field(3, 5) + threshold(0.5),
        "identify-target-fmr.pb": field(1, "g") + field(2, image_message(b"x")) + field(3, 100) + fmr(1e-3),
        "identify-nan-threshold.pb": field(1, "g") + field(2, image_message(b"x")) + field(3, 1) + threshold(float("nan")),
        "identify-fmr-one.pb": field(1, "g") + field(2, image_message(b"x")) + field(3, 1) + fmr(1.0),
        "identify-top-k-101.pb": field(1, "g") + field(2, image_message(b"x")) + field(3, 101),
        "identify-no-image.pb": field(1, "g") + field(3, 1),
        "verify.pb": field(1, "lobby") + field(2, "subject-1") + field(3, image_message(png)) + fmr(1e-4),
        "list.pb": field(1, "lobby") + field(2, 1000) + field(3, "p1." + b"subject-42".hex()),
        "list-page-1001.pb": field(1, "g") + field(2, 1001),
        "list-foreign-token.pb": field(1, "g") + field(3, "p1.zz"),
        "list-token-with-bad-id.pb": field(1, "g") + field(3, "p1." + b"a b\x00".hex()),
        "reload.pb": field(1, "/srv/handid/checkpoints/v2") + field(2, 1),
        "reload-unknown-mode.pb": field(2, 7),
        "reload-nul-in-path.pb": field(1, "/srv/ckpt\0/../../etc"),
        "promote.pb": field(1, 1),
        "unknown-fields.pb": field(9, "extra") + field(1, "g") + field(15, 3) + field(2, "s"),
        "negative-varints.pb": field(2, -1) + field(3, -1),
        "invalid-utf8.pb": field(1, b"g\xff\xfe") + field(2, "s"),
        "group-wire-type.pb": bytes([0x0B, 0x0A, 0x01, 0x67, 0x0C]),
        "empty.pb": b"",
    }


def main() -> None:
    regressions = ROOT.parent / "regressions" / "image"
    for folder, files in [(IMAGES, images()), (REQUESTS, requests()), (regressions, image_regressions())]:
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (folder / name).write_bytes(data)
        print(f"{folder}: {len(files)} files, {sum(map(len, files.values()))} bytes")


if __name__ == "__main__":
    main()
